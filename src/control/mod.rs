//! The control plane: the admin gRPC service and its tokens, policy edits item by item,
//! keeping every replica's snapshot in step with the store, and the health and metrics
//! endpoints.

pub mod admin;
pub mod health;
pub mod items;
pub mod sync;
pub mod tokens;
