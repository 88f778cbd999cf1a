//! Policy as data: the policy file's model and its validation, and the rows it is stored
//! as. Nothing here does I/O beyond reading a secret reference's file or variable.

pub mod alerts;
pub mod file;
pub mod identity;
pub mod mcp;
pub mod period;
pub mod rows;
pub(crate) mod secrets;
pub mod target;
pub(crate) mod validate;

pub use alerts::{Alerts, Webhook, WebhookFormat};
pub use file::*;
pub use identity::{Identity, JwksSource};
pub use mcp::{McpCondition, McpSpec, Protocol, ToolSpec};
pub use period::Period;
pub use secrets::ServerSource;
pub use target::TargetUrl;
