//! The control plane: the admin gRPC service and its tokens, policy edits item by item,
//! keeping every replica's snapshot in step with the store and with the secrets the
//! server reads itself, and the health and metrics endpoints.

pub mod admin;
pub mod alerts;
pub mod approvals;
pub mod health;
pub mod items;
pub mod keys;
pub mod secrets;
pub mod sync;
pub mod tokens;
