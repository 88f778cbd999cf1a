//! The bottom layer: the clock, money, cryptography and trace context every other layer
//! uses. Imports
//! nothing of latchkey's.

pub mod clock;
pub mod crypto;
pub mod money;
pub mod trace;
