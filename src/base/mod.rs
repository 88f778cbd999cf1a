//! The bottom layer: the clock, money, cryptography (JWTs too) and trace context every other layer
//! uses. Imports
//! nothing of latchkey's.

pub mod clock;
pub mod crypto;
pub mod jwt;
pub mod money;
pub mod trace;
