//! End to end: an agent calls the real Envoy with a proxy key; latchkey decides; an
//! in-test upstream records what the vendor would see. One binary, one shared harness.

mod admin;
mod alerts;
mod approvals;
mod audit;
mod audit_chain;
mod budgets;
mod cli;
mod common;
mod containment;
mod data_plane;
mod ext_authz;
mod guards;
mod identity;
mod inprocess;
mod items;
mod llm;
mod mcp;
mod oauth2;
mod observability;
mod replay;
mod response_safety;
mod rules;
mod scale_out;
mod sdks;
mod server_secrets;
mod sigv4;
