//! The data plane: what happens to each request an agent sends, from the compiled
//! snapshot and the budget counters only (never the database, never protobuf: `envoy`
//! converts at the edge).
//!
//! The request path, in the order the code runs it ([`pipeline`] runs steps 1 to 5,
//! [`admission`] 6 to 8):
//!
//! 1. **route** ([`route`]): the first path segment names the proxy; the rest, normalised
//!    and with hostile encodings refused, is the upstream path. `TRACE` and `TRACK`,
//!    which an upstream echoes back with the credential, are refused first.
//! 2. **authenticate** ([`keys`]): the proxy key from whichever header carries it, looked
//!    up by hash in the snapshot, expiry and quarantine checked. Before the proxy is said to be unknown,
//!    so a caller without a key cannot list proxies.
//! 3. **scope** ([`pipeline`], from the [`snapshot`]): the proxy exists and the key's
//!    credential is bound to it; the limits of both are gathered, and on a priced proxy
//!    the accounts a charge goes to.
//! 4. **rules** ([`rules`]): the credential's rules, then the proxy's, by priority; the
//!    first match decides, else the proxy's default. A rule on the body asks for it.
//! 5. **mutate** ([`mutate`]): what the upstream receives: every carrier of the proxy key
//!    removed, the real credential set (a header, a query parameter or a SigV4
//!    signature, [`credentials`]), and on token-priced proxies the model read and the
//!    usage asked for ([`usage`]); on a guarded proxy, a POST or PATCH fingerprinted and
//!    given an `Idempotency-Key` where it has none ([`guards`]).
//! 6. **approval** ([`approval`]): a request an `approve` rule holds goes only once a
//!    person approved exactly it; else 403 `approval_required` with the approval's id.
//!    **budgets** ([`budget`], [`spend`]): first the duplicate guard (a repeat within the
//!    window: 409), then rate limits, token budgets and the spend reservation; a refusal
//!    answers 429 with `Retry-After`. A request Envoy may retry leaves its limits behind
//!    for its retries, which `envoy::access_log` charges when it learns of them.
//! 7. **fetched credentials** ([`credentials::oauth2`]): an OAuth2 token goes in last,
//!    once the request is admitted.
//! 8. **record**: the decision into the metrics and the audit (`telemetry`).
//!
//! And on the way back, in `envoy::ext_proc`: the response guard ([`redact`]) scrubs
//! echoes of the credential and redacts fields; a priced answer is metered as it streams
//! ([`usage`]) and settled when it ends ([`spend`]): its price, or the reservation when
//! its usage cannot be read.
//!
//! Off the path, `control::alerts` weighs what the audit stored against each key's and
//! proxy's baseline, and quarantines a key through the snapshot (step 2).
//!
//! Every refusal is a [`denial::Denial`], mapped to a status and a body once.

pub mod admission;
pub mod approval;
pub mod budget;
mod compile;
pub(crate) mod credentials;
pub mod denial;
pub mod facts;
pub(crate) mod guards;
pub mod identity;
mod inprocess;
pub mod keys;
pub mod mcp;
pub mod mint;
pub(crate) mod mutate;
pub(crate) mod names;
pub mod pipeline;
pub(crate) mod redact;
pub mod request;
pub(crate) mod route;
pub mod rules;
pub(crate) mod shared;
pub mod snapshot;
pub mod spend;
pub mod usage;

pub use shared::Shared;
