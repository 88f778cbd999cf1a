//! What `latchkey serve` and the in-process module say to each other over their Unix
//! socket: frames of a 4-byte big-endian length and a body. `serve` pushes the policy
//! (JSON, as the store keeps it), then each change of keys alone as that change; the
//! module sends back the audit, in batches encoded as
//! protobuf: the module encodes every request's record inside Envoy, where JSON's
//! escaping made the audit thread's cost 9,000 instructions a record (3,700 now). A
//! batch carries no build of its own: the module sends none until `serve`'s push has
//! named the same [`BUILD`].

use std::io::{self, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::base::trace::TraceParent;
use crate::dataplane::denial::Kind;
use crate::dataplane::snapshot::KeyChange;
use crate::policy::rows::StoredPolicy;
use crate::policy::secrets::ServerSource;
use crate::telemetry::audit::{Completed, Decided};

/// The largest push the module accepts: a policy with a few hundred thousand keys.
pub const MAX_FRAME: usize = 512 << 20;

/// The largest batch `serve` accepts; the module sends a quarter of it at most.
pub const MAX_BATCH_FRAME: usize = 32 << 20;

/// The most records in a batch, which the module sends and `serve` accepts.
pub const BATCH_RECORDS: usize = 1024;

/// The most rate-limit counts in a batch, which the module sends and `serve` accepts.
pub const BATCH_COUNTS: usize = 65_536;

/// What both sides must have been built from to talk: a module of another latchkey
/// could read a policy without the parts it does not know, and decide by less.
pub const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "/wire-4");

/// How often `serve` tells a connected module it is there, between pushes.
pub const BEAT: Duration = Duration::from_secs(1);

/// How long a module hears nothing from `serve` (no push, no change, no beat) before
/// it takes `serve` for hung and stops deciding: a `serve` stuck with the socket open
/// would otherwise leave its last policy in force, revoked keys and all, while the
/// store and the other replicas moved on.
pub const SILENCE: Duration = Duration::from_secs(10);

/// `serve` to the module.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ToModule {
    /// The whole policy: on connecting, and after every change but of keys alone.
    Policy(Box<Push>),
    /// Keys issued, revoked, quarantined or released since version `from`, which made
    /// version `version`: compiling 100,000 keys again for each would take the module
    /// seconds, and a revocation would wait for it.
    Keys {
        from: i64,
        version: i64,
        changes: Vec<KeyChange>,
    },
    /// Nothing new: `serve` is there ([`BEAT`]).
    Beat,
    /// `serve`'s rate-limit counts, sent once more when a module says it has compiled a
    /// whole policy: while it compiled, `serve` decided, and counted, what it handed on.
    /// In place of a beat.
    Counts(Vec<(String, u64)>),
}

impl ToModule {
    /// The build and version a frame this build cannot read names, if it names them as
    /// a push of this build or of the one before (a bare [`Push`]) does.
    pub fn foreign(body: &[u8]) -> (Option<String>, Option<i64>) {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let push = value.get("Policy").unwrap_or(&value);
        let build = push
            .get("build")
            .and_then(|b| b.as_str())
            .map(str::to_owned);
        (build, push.get("version").and_then(|v| v.as_i64()))
    }
}

/// `serve` to the module: the policy to decide by.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Push {
    /// [`BUILD`] of the `serve` that pushed it.
    pub build: String,
    /// The store's policy version.
    pub version: i64,
    /// Whether `serve` counts limits in a store all replicas share.
    pub shared_budgets: bool,
    /// The key the credentials' secrets are sealed with for this connection alone: the
    /// store's master key never leaves `serve`.
    pub channel_key: Zeroizing<String>,
    pub stored: StoredPolicy,
    /// The secrets `serve` reads itself, as it read them.
    pub server: Vec<(ServerSource, Result<Zeroizing<String>, String>)>,
    pub server_generation: u64,
    /// The rate limits in use and their counts as `serve` has them (it counts what the
    /// modules decide, from their records): a module in an Envoy just restarted takes
    /// them up rather than start every limit afresh.
    pub counts: Vec<(String, u64)>,
}

/// The module to `serve`: requests it decided, and the policy version it has taken up
/// (a push it compiled, or one it could not and logged).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<Record>,
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
    /// The module's rate-limit counts, sent as it starts to compile a whole policy.
    /// Until it has, `serve` decides what the module would, and `serve` knows a request
    /// the module let through only from its record, which comes when the request ends:
    /// without these, requests held open across a push would not count there.
    #[prost(message, repeated, tag = "3")]
    pub counts: Vec<Count>,
}

/// A rate limit's count: its key and when it is next free, in µs (`Budgets::in_use`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Count {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(uint64, tag = "2")]
    pub until_us: u64,
}

/// One request the module decided, and how it ended (`None` if Envoy never said).
/// HTTP statuses travel as `uint32`, protobuf's narrowest.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(int64, tag = "2")]
    pub time_ms: i64,
    #[prost(uint32, tag = "3")]
    pub elapsed_us: u32,
    #[prost(string, optional, tag = "4")]
    pub proxy: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub target: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub credential: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub key_id: Option<String>,
    #[prost(string, optional, tag = "8")]
    pub run_label: Option<String>,
    #[prost(string, tag = "9")]
    pub method: String,
    #[prost(string, tag = "10")]
    pub path: String,
    #[prost(uint32, optional, tag = "11")]
    pub status: Option<u32>,
    #[prost(string, tag = "12")]
    pub decision: String,
    #[prost(string, optional, tag = "13")]
    pub rule_id: Option<String>,
    #[prost(string, optional, tag = "14")]
    pub facts: Option<String>,
    #[prost(string, optional, tag = "15")]
    pub trace: Option<String>,
    #[prost(bool, tag = "16")]
    pub near_cap: bool,
    #[prost(message, optional, tag = "17")]
    pub completed: Option<Ending>,
}

/// How a request ended, as Envoy told the module.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ending {
    #[prost(uint32, optional, tag = "1")]
    pub status: Option<u32>,
    /// The status, when the upstream sent it (not Envoy, nor the module).
    #[prost(uint32, optional, tag = "2")]
    pub upstream_status: Option<u32>,
    #[prost(double, optional, tag = "3")]
    pub latency_ms: Option<f64>,
    #[prost(uint64, tag = "4")]
    pub bytes_in: u64,
    #[prost(uint64, tag = "5")]
    pub bytes_out: u64,
}

/// An HTTP status as it travelled; one no status could be is dropped.
fn status(s: Option<u32>) -> Option<u16> {
    s.and_then(|s| u16::try_from(s).ok())
}

impl Record {
    /// Taken by value: the strings a request owns move into its record.
    pub fn of(decided: Decided) -> Self {
        let text = |s: Option<std::sync::Arc<str>>| s.as_deref().map(str::to_owned);
        Self {
            request_id: decided.request_id,
            time_ms: decided.time_ms,
            elapsed_us: decided.elapsed_us,
            proxy: text(decided.proxy),
            target: text(decided.target),
            credential: text(decided.credential),
            key_id: text(decided.key_id),
            run_label: text(decided.run_label),
            method: decided.method,
            path: decided.path,
            status: decided.status.map(u32::from),
            decision: decided.decision.to_owned(),
            rule_id: text(decided.rule_id),
            facts: decided.facts.map(String::from),
            trace: decided.trace.map(|t| t.to_string()),
            near_cap: decided.near_cap,
            completed: None,
        }
    }

    /// The audit's two halves; `None` for a decision this latchkey has no name for
    /// (a module of another version).
    pub fn into_events(self) -> Option<(Decided, Option<Completed>)> {
        let decision = Kind::named(&self.decision)?.as_str();
        let arc = |s: Option<String>| s.map(std::sync::Arc::<str>::from);
        let completed = self.completed.map(|e| Completed {
            request_id: self.request_id.clone(),
            status: status(e.status),
            upstream_status: status(e.upstream_status),
            latency_ms: e.latency_ms,
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            retries: 0,
        });
        let decided = Decided {
            request_id: self.request_id,
            time_ms: self.time_ms,
            elapsed_us: self.elapsed_us,
            proxy: arc(self.proxy),
            target: arc(self.target),
            credential: arc(self.credential),
            key_id: arc(self.key_id),
            run_label: arc(self.run_label),
            method: self.method,
            path: self.path,
            status: status(self.status),
            decision,
            rule_id: arc(self.rule_id),
            facts: self.facts.map(String::into_boxed_str),
            trace: self.trace.and_then(|t| TraceParent::parse(t.as_bytes())),
            near_cap: self.near_cap,
        };
        Some((decided, completed))
    }
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(out: &mut impl Write, value: &T) -> io::Result<()> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    let length = u32::try_from(body.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("frame too large"))?;
    out.write_all(&length.to_be_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

/// Reads one frame of at most [`MAX_FRAME`] bytes; `Ok(None)` at a clean end of the
/// stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(input: &mut impl Read) -> io::Result<Option<T>> {
    let Some(body) = read_body(input)? else {
        return Ok(None);
    };
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One frame's body, of at most [`MAX_FRAME`] bytes, unparsed; `Ok(None)` at a clean end
/// of the stream.
pub fn read_body(input: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 4];
    match input.read_exact(&mut length) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_FRAME {
        return Err(io::Error::other("frame too large"));
    }
    let mut body = vec![0u8; length];
    input.read_exact(&mut body)?;
    Ok(Some(body))
}

impl Batch {
    /// The batch as one frame.
    pub fn frame(&self) -> Vec<u8> {
        let length = prost::Message::encoded_len(self);
        let mut out = Vec::with_capacity(4 + length);
        // The module's batches stay under a quarter of `MAX_BATCH_FRAME`: far below 4 GiB.
        out.extend_from_slice(&(length as u32).to_be_bytes());
        prost::Message::encode(self, &mut out).expect("a Vec grows to fit");
        out
    }

    /// A frame's body as a batch, of [`BATCH_RECORDS`] and [`BATCH_COUNTS`] at most.
    /// They are counted before any is decoded: an empty record is 2 bytes in a frame and
    /// hundreds in memory, so a frame of empty records would ask `serve` for gigabytes.
    pub fn parse(body: &[u8]) -> io::Result<Self> {
        let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut fields = body;
        let (mut records, mut counts) = (0, 0);
        while !fields.is_empty() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut fields).map_err(invalid)?;
            records += usize::from(tag == 1);
            counts += usize::from(tag == 3);
            if records > BATCH_RECORDS || counts > BATCH_COUNTS {
                let more = format!(
                    "more than {BATCH_RECORDS} records or {BATCH_COUNTS} counts in a batch"
                );
                return Err(io::Error::new(io::ErrorKind::InvalidData, more));
            }
            prost::encoding::skip_field(wire_type, tag, &mut fields, Default::default())
                .map_err(invalid)?;
        }
        <Self as prost::Message>::decode(body).map_err(invalid)
    }
}

/// A frame's length and body, for the async side to write.
pub fn frame<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    write_frame(&mut out, value)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_longer_than_allowed_is_refused_unread() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(read_frame::<Push>(&mut &bytes[..]).is_err());
        assert!(read_frame::<Push>(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn a_batch_comes_back_as_it_went() {
        let record = Record {
            request_id: "r-1".into(),
            method: "GET".into(),
            path: "/v1/items".into(),
            status: Some(403),
            decision: "rule_denied".into(),
            facts: Some(r#"{"a":"\"b\""}"#.into()),
            completed: Some(Ending {
                status: Some(403),
                latency_ms: Some(0.25),
                ..Ending::default()
            }),
            ..Record::default()
        };
        let batch = Batch {
            records: vec![record],
            version: Some(7),
            counts: vec![Count {
                key: "c:agent:rpm".into(),
                until_us: 1_700_000_000_000_000,
            }],
        };
        let frame = batch.frame();
        let length = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(length, frame.len() - 4);
        assert_eq!(Batch::parse(&frame[4..]).unwrap(), batch);
    }

    #[test]
    fn a_batch_of_more_records_or_counts_than_the_module_sends_is_refused_undecoded() {
        let full = Batch {
            records: vec![Record::default(); BATCH_RECORDS],
            version: Some(7),
            counts: vec![Count::default(); BATCH_COUNTS],
        };
        assert_eq!(Batch::parse(&full.frame()[4..]).unwrap(), full);
        // One more; and the frame of empty records an attacker would send: 2 bytes each.
        let mut over = full.frame()[4..].to_vec();
        over.extend_from_slice(&[0x0a, 0x00]);
        assert!(Batch::parse(&over).is_err());
        // So too one more count.
        let mut over = full.frame()[4..].to_vec();
        over.extend_from_slice(&[0x1a, 0x00]);
        assert!(Batch::parse(&over).is_err());
        let empties = [0x0a, 0x00].repeat(MAX_BATCH_FRAME / 2);
        assert!(Batch::parse(&empties).is_err());
        // A truncated field is an error, not a panic.
        assert!(Batch::parse(&[0x0a, 0x05, 0x01]).is_err());
    }

    #[test]
    fn a_status_out_of_range_is_dropped_not_wrapped() {
        assert_eq!(status(Some(70_000)), None);
        assert_eq!(status(Some(503)), Some(503));
    }

    proptest! {
        /// Whatever arrives, reading it ends in a push, a batch or an error, never a panic.
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_frame::<Push>(&mut &bytes[..]);
            let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            let _ = read_frame::<Push>(&mut &framed[..]);
            let _ = Batch::parse(&bytes);
        }
    }
}
