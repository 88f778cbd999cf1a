//! The bottom layer: the clock, money and cryptography every other layer uses. Imports
//! nothing of latchkey's.

pub mod clock;
pub mod crypto;
pub mod money;
