//! LLM token usage: what OpenAI- and Anthropic-style APIs report a call consumed, read
//! from a JSON answer or from an event stream as it passes (never held back), and
//! priced per model. Also the one request change this needs: a streamed OpenAI chat
//! completion is asked to report its usage (`stream_options.include_usage`).

use std::collections::HashMap;

use serde_json::Value;

use crate::base::money::{Price, Usage};
use crate::policy::Vendor;

/// A proxy's price table: by the request's `model`, exactly, then `"*"`.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    pub by_model: HashMap<String, Price>,
}

impl PriceTable {
    /// The entry a model is priced by, and its name in the table (a metric label:
    /// only names from the policy, never the client's).
    pub fn lookup(&self, model: Option<&str>) -> Option<(&str, &Price)> {
        model
            .and_then(|m| self.by_model.get_key_value(m))
            .or_else(|| self.by_model.get_key_value("*"))
            .map(|(k, p)| (k.as_str(), p))
    }
}

/// The most of a JSON answer kept to read its usage: Envoy's buffer limit.
const MAX_JSON: usize = 1 << 20;
/// The longest event-stream line kept while it arrives; a longer one carries content,
/// not usage, and is skipped.
const MAX_LINE: usize = 1 << 20;

/// Usage fields as reported, each the latest seen: a stream reports them in parts
/// (Anthropic: input in `message_start`, the final output in `message_delta`).
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    input: Option<u64>,
    cached: Option<u64>,
    output: Option<u64>,
}

impl Seen {
    fn merge(&mut self, other: Seen) {
        self.input = other.input.or(self.input);
        self.cached = other.cached.or(self.cached);
        self.output = other.output.or(self.output);
    }

    fn usage(self) -> Option<Usage> {
        let (input, output) = (self.input?, self.output?);
        let cached = self.cached.unwrap_or(0);
        Some(Usage {
            input: input.saturating_sub(cached.min(input)),
            cached_input: cached,
            output,
        })
    }
}

/// The usage a vendor's JSON object reports, if it reports any. For OpenAI the input
/// count includes the cached tokens (subtracted in [`Seen::usage`]); Anthropic counts
/// them apart, so they are added here.
fn usage_of(vendor: Vendor, v: &Value) -> Option<Seen> {
    let n = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64);
    match vendor {
        Vendor::OpenAi => {
            let u = v
                .get("usage")
                .filter(|u| u.is_object())
                .or_else(|| v.get("response")?.get("usage"))?;
            if let Some(prompt) = n(u, "prompt_tokens") {
                Some(Seen {
                    input: Some(prompt),
                    cached: u
                        .get("prompt_tokens_details")
                        .and_then(|d| n(d, "cached_tokens")),
                    output: n(u, "completion_tokens"),
                })
            } else {
                Some(Seen {
                    input: n(u, "input_tokens"),
                    cached: u
                        .get("input_tokens_details")
                        .and_then(|d| n(d, "cached_tokens")),
                    output: n(u, "output_tokens"),
                })
            }
        }
        Vendor::Anthropic => {
            let u = v
                .get("usage")
                .filter(|u| u.is_object())
                .or_else(|| v.get("message")?.get("usage"))?;
            let read = n(u, "cache_read_input_tokens");
            let input = n(u, "input_tokens")
                .map(|i| i + n(u, "cache_creation_input_tokens").unwrap_or(0) + read.unwrap_or(0));
            Some(Seen {
                input,
                cached: read,
                output: n(u, "output_tokens"),
            })
        }
    }
}

/// Reads usage from an answer as its chunks pass by.
#[derive(Debug)]
pub struct Meter {
    vendor: Vendor,
    kind: Kind,
    seen: Seen,
}

#[derive(Debug)]
enum Kind {
    /// A JSON answer, gathered (up to [`MAX_JSON`]) to be read at its end.
    Json { body: Vec<u8>, overflowed: bool },
    /// An event stream: each complete `data:` line that mentions usage is read.
    Events { line: Vec<u8>, skipping: bool },
}

impl Meter {
    /// A meter for an answer of this content type, if its usage can be read at all.
    pub fn for_content_type(vendor: Vendor, content_type: &[u8]) -> Option<Self> {
        let kind = if media_type(content_type).eq_ignore_ascii_case(b"text/event-stream") {
            Kind::Events {
                line: Vec::new(),
                skipping: false,
            }
        } else if is_json_media_type(content_type) {
            Kind::Json {
                body: Vec::new(),
                overflowed: false,
            }
        } else {
            return None;
        };
        Some(Self {
            vendor,
            kind,
            seen: Seen::default(),
        })
    }

    /// Takes the next chunk of the answer.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.kind {
            Kind::Json { body, overflowed } => {
                if body.len() + chunk.len() > MAX_JSON {
                    *overflowed = true;
                    body.clear();
                } else if !*overflowed {
                    body.extend_from_slice(chunk);
                }
            }
            Kind::Events { line, skipping } => {
                let mut rest = chunk;
                while let Some(end) = memchr::memchr(b'\n', rest) {
                    if !*skipping {
                        line.extend_from_slice(&rest[..end]);
                        let seen = event_usage(self.vendor, line);
                        if let Some(seen) = seen {
                            self.seen.merge(seen);
                        }
                    }
                    line.clear();
                    *skipping = false;
                    rest = &rest[end + 1..];
                }
                if !*skipping {
                    if line.len() + rest.len() > MAX_LINE {
                        line.clear();
                        *skipping = true;
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
        }
    }

    /// The usage of the whole answer, once it has ended; `None` if it did not say.
    pub fn finish(mut self) -> Option<Usage> {
        match &mut self.kind {
            Kind::Json { body, overflowed } => {
                if *overflowed {
                    return None;
                }
                let value: Value = serde_json::from_slice(body).ok()?;
                self.seen.merge(usage_of(self.vendor, &value)?);
            }
            Kind::Events { .. } => self.feed(b"\n"),
        }
        self.seen.usage()
    }
}

/// `application/json` or any `…+json`, parameters aside.
pub fn is_json_media_type(content_type: &[u8]) -> bool {
    let media = media_type(content_type);
    media.eq_ignore_ascii_case(b"application/json")
        || (media.len() > 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// A content type without its parameters (`; charset=…`).
fn media_type(content_type: &[u8]) -> &[u8] {
    content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// The usage one event-stream line reports, if it is a `data:` line that reports any.
fn event_usage(vendor: Vendor, line: &[u8]) -> Option<Seen> {
    let data = line.strip_prefix(b"data:")?.trim_ascii();
    // Most events carry content only: skip them without parsing.
    memchr::memmem::find(data, b"\"usage\"")?;
    let value: Value = serde_json::from_slice(data).ok()?;
    usage_of(vendor, &value)
}

/// What a token-priced request asks for, read from its JSON body.
#[derive(Debug, Default)]
pub struct Asked {
    pub model: Option<String>,
    /// The body to send instead: a streamed OpenAI chat completion that did not ask for
    /// its usage is made to, so that the stream reports what it cost.
    pub rewritten: Option<Vec<u8>>,
}

/// Reads the request body of a call to `path` on a `vendor` proxy.
pub fn asked(vendor: Vendor, path: &str, body: &[u8]) -> Asked {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(body) else {
        return Asked::default();
    };
    let model = object
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let streamed = object.get("stream").and_then(Value::as_bool) == Some(true);
    let chat = path.ends_with("/chat/completions");
    let reports = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let rewritten = (vendor == Vendor::OpenAi && chat && streamed && !reports).then(|| {
        if object.contains_key("stream_options") {
            // Rare: options given without usage. Set it and write the body anew.
            if let Some(Value::Object(options)) = object.get_mut("stream_options") {
                options.insert("include_usage".into(), Value::Bool(true));
            } else {
                object.insert(
                    "stream_options".into(),
                    serde_json::json!({ "include_usage": true }),
                );
            }
            serde_json::to_vec(&object).expect("JSON serializes")
        } else {
            // Otherwise the agent's bytes stay as they are, one member added in front.
            let start = body.iter().position(|&b| b == b'{').expect("an object") + 1;
            let mut out = Vec::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..start]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            out.extend_from_slice(&body[start..]);
            out
        }
    });
    Asked { model, rewritten }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::money::price;

    fn meter(vendor: Vendor, content_type: &str, chunks: &[&str]) -> Option<Usage> {
        let mut m = Meter::for_content_type(vendor, content_type.as_bytes()).unwrap();
        for c in chunks {
            m.feed(c.as_bytes());
        }
        m.finish()
    }

    #[test]
    fn openai_chat_and_responses_json_and_streams() {
        let chat = r#"{"id":"x","object":"chat.completion","usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,"prompt_tokens_details":{"cached_tokens":40}}}"#;
        let want = Usage {
            input: 60,
            cached_input: 40,
            output: 20,
        };
        assert_eq!(
            meter(Vendor::OpenAi, "application/json", &[chat]),
            Some(want)
        );
        // Split anywhere.
        let (a, b) = chat.split_at(37);
        assert_eq!(
            meter(Vendor::OpenAi, "application/json; charset=utf-8", &[a, b]),
            Some(want)
        );
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":20,\"prompt_tokens_details\":{\"cached_tokens\":40}}}\n\n\
                      data: [DONE]\n\n";
        for split in [1, 10, 50, 80, 120, stream.len() - 3] {
            let (a, b) = stream.split_at(split);
            assert_eq!(
                meter(Vendor::OpenAi, "text/event-stream", &[a, b]),
                Some(want),
                "{split}"
            );
        }
        let responses = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
                         event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":100,\"input_tokens_details\":{\"cached_tokens\":40},\"output_tokens\":20}}}\n\n";
        assert_eq!(
            meter(Vendor::OpenAi, "text/event-stream", &[responses]),
            Some(want)
        );
        // A stream that never reports usage cannot be priced.
        assert_eq!(
            meter(
                Vendor::OpenAi,
                "text/event-stream",
                &["data: {\"choices\":[]}\n\ndata: [DONE]\n\n"]
            ),
            None
        );
        assert!(Meter::for_content_type(Vendor::OpenAi, b"text/html").is_none());
    }

    #[test]
    fn anthropic_json_and_stream() {
        let json = r#"{"type":"message","usage":{"input_tokens":50,"cache_creation_input_tokens":10,"cache_read_input_tokens":40,"output_tokens":20}}"#;
        let want = Usage {
            input: 60,
            cached_input: 40,
            output: 20,
        };
        assert_eq!(
            meter(Vendor::Anthropic, "application/json", &[json]),
            Some(want)
        );
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":50,\"cache_creation_input_tokens\":10,\"cache_read_input_tokens\":40,\"output_tokens\":1}}}\n\n\
                      event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":20}}\n\n\
                      event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(
            meter(Vendor::Anthropic, "text/event-stream", &[stream]),
            Some(want)
        );
        // Cut before the final count: the output is not known.
        let cut = &stream[..stream.find("event: message_delta").unwrap()];
        let partial = meter(Vendor::Anthropic, "text/event-stream", &[cut]).unwrap();
        assert_eq!(partial.output, 1, "only what was seen");
    }

    #[test]
    fn priced_per_million_by_model_then_star() {
        let table = PriceTable {
            by_model: [
                (
                    "gpt-4o-mini".to_owned(),
                    Price {
                        input: 0.15,
                        output: 0.60,
                        cached_input: Some(0.075),
                    },
                ),
                (
                    "*".to_owned(),
                    Price {
                        input: 5.0,
                        output: 15.0,
                        cached_input: None,
                    },
                ),
            ]
            .into(),
        };
        let u = Usage {
            input: 1_000_000,
            cached_input: 1_000_000,
            output: 1_000_000,
        };
        let (name, p) = table.lookup(Some("gpt-4o-mini")).unwrap();
        assert_eq!((name, price(&u, p)), ("gpt-4o-mini", 825_000));
        let (name, p) = table.lookup(Some("o3")).unwrap();
        assert_eq!((name, price(&u, p)), ("*", 25_000_000));
        assert_eq!(table.lookup(None).unwrap().0, "*");
    }

    #[test]
    fn a_streamed_chat_is_asked_for_its_usage() {
        let a = asked(
            Vendor::OpenAi,
            "/v1/chat/completions",
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
        );
        assert_eq!(a.model.as_deref(), Some("gpt-4o-mini"));
        let body: Value = serde_json::from_slice(&a.rewritten.unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"], serde_json::json!([]));
        let with_options = asked(
            Vendor::OpenAi,
            "/v1/chat/completions",
            br#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#,
        );
        let body: Value = serde_json::from_slice(&with_options.rewritten.unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["include_obfuscation"], false);
        for (vendor, path, body) in [
            (
                Vendor::OpenAi,
                "/v1/chat/completions",
                &br#"{"model":"m"}"#[..],
            ),
            (
                Vendor::OpenAi,
                "/v1/chat/completions",
                br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (Vendor::OpenAi, "/v1/responses", br#"{"stream":true}"#),
            (Vendor::Anthropic, "/v1/messages", br#"{"stream":true}"#),
            (Vendor::OpenAi, "/v1/chat/completions", b"not json"),
        ] {
            assert!(asked(vendor, path, body).rewritten.is_none(), "{path}");
        }
    }
}
