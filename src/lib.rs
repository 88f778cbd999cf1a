//! latchkey: a credential gateway for AI agents. Envoy asks latchkey about every request
//! (ext_proc); latchkey checks the agent's proxy key and the policy, and swaps the key for
//! the real upstream credential, which the agent never sees.
//!
//! One folder per layer, each importing only from the layers above it in this list
//! (a test holds it so):
//!
//! - [`base`]: the clock, money, cryptography.
//! - [`policy`]: the policy file's model and validation, and the rows it is stored as.
//! - [`store`]: every SQL statement.
//! - [`telemetry`]: the audit writer, OpenTelemetry export, metrics.
//! - [`dataplane`]: the request path (its module doc lists the steps), from an in-memory
//!   snapshot and budget counters.
//! - [`envoy`]: ext_proc, ext_authz and the access log: Envoy's protobuf at the edge.
//! - [`control`]: the admin API, its tokens, policy sync, health.
//! - [`serve`]: the server, wired together.
//! - [`cli`]: the `latchkey` command.
#![forbid(unsafe_code)]

pub mod base;
pub mod cli;
pub(crate) mod control;
pub mod dataplane;
pub mod envoy;
pub mod policy;
pub(crate) mod serve;
pub mod store;
pub mod telemetry;

#[cfg(test)]
mod layers;

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
