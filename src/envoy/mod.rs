//! The edge Envoy talks to: the ext_proc and ext_authz services, Envoy's gRPC access log
//! (the audit's completions), the conversions between Envoy's protobuf and the data
//! plane's types, and the channel's mutual TLS.

pub(crate) mod access_log;
pub mod channel;
pub mod convert;
pub(crate) mod ext_authz;
pub(crate) mod ext_proc;
pub mod module;
