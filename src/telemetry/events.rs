//! What the audit records, as events: a decision, a completion, a charge. Written to the
//! store by the audit writer and exported over OTLP.

use std::sync::Arc;

use crate::base::trace::TraceParent;

pub use crate::store::audit::{Completed, Decided, Llm};

#[derive(Debug, Clone)]
pub enum Event {
    Decided(Decided),
    Completed(Completed),
    /// What a priced request cost: added to its record and to its key's spend.
    Charged {
        request_id: String,
        /// When the request was decided, Unix milliseconds.
        started_ms: i64,
        key_id: Arc<str>,
        micros: u64,
        /// What an LLM answer reported it consumed.
        llm: Option<Llm>,
        /// The agent's trace, which the call's span joins.
        trace: Option<TraceParent>,
    },
}
