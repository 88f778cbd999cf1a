//! Envoy's in-process mode: latchkey's data plane inside Envoy, as a dynamic module.
//! The module's FFI lives in a crate of its own; what it runs is here, safe. `latchkey
//! serve` stays the control plane: it pushes the policy over an owner-only Unix socket
//! and stores the audit the module sends back.

pub mod engine;
mod outbox;
pub mod pin;
pub mod wire;
