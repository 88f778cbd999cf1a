//! latchkey: a credential gateway for AI agents. Envoy asks latchkey about every request
//! (ext_proc); latchkey checks the agent's proxy key and the policy, and swaps the key for
//! the real upstream credential, which the agent never sees.
//!
//! The request path, one module per step: [`route`] → [`keys`] → scope ([`policy`]) →
//! [`rules`] → [`budget`] → [`mutate`] → [`audit`], tied together by [`pipeline`].
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod audit;
pub mod budget;
pub mod channel;
pub mod cli;
pub mod crypto;
pub mod denial;
pub mod envoy;
pub mod ext_authz;
pub mod ext_proc;
pub mod http;
pub mod items;
pub mod keys;
pub mod mutate;
pub mod oauth2;
pub mod otel;
pub mod pipeline;
pub mod policy;
pub mod policy_file;
pub mod redact;
pub mod request_log;
pub mod route;
pub mod rules;
pub mod serve;
pub mod sigv4;
pub mod spend;
pub mod state;
pub mod store;
pub mod sync;
pub mod tokens;
pub mod usage;

/// latchkey's admin API, generated from `proto/latchkey/admin/v1/admin.proto`.
pub mod pb {
    tonic::include_proto!("latchkey.admin.v1");

    /// The admin API's descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("latchkey_admin_descriptor");
}

/// The fields of Envoy's gRPC access log that latchkey reads, generated from
/// `proto/latchkey/envoy/access_log.proto`.
pub mod access_log_pb {
    tonic::include_proto!("envoy.service.accesslog.v3");
}
