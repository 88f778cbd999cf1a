//! MCP proxies (`protocol: mcp`): every POST of the streamable HTTP transport is one
//! JSON-RPC message, read for its method and, on `tools/call`, its tool: what the rules'
//! `mcp` conditions judge, what per-tool limits and prices apply to, and what the audit
//! keeps. GET (the server's stream) and DELETE (the session's end) carry no message and
//! pass on the rules like any request; every one of them gets the credential.

use crate::dataplane::denial::Denial;
use crate::dataplane::request::RequestView;
use crate::dataplane::rules::Body;

/// Longest method or tool name: longer ones are refused.
const MAX_NAME: usize = 128;

/// One JSON-RPC message, as far as latchkey reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `None` for a response the client sends the server (to sampling, elicitation).
    pub method: Option<Box<str>>,
    /// The tool a `tools/call` calls.
    pub tool: Option<Box<str>>,
    /// The request's id, which a refusal answers; `None` for a notification.
    pub id: Option<serde_json::Value>,
}

/// What an MCP proxy's request is.
#[derive(Debug)]
pub enum Message {
    /// Not a POST: the server's stream (GET) or the session's end (DELETE).
    None,
    /// A POST whose body is not read yet.
    NeedBody,
    Call(Call),
}

/// Reads the message a request carries. A POST must carry exactly one JSON-RPC object
/// sent as JSON (no batch: one message is judged, priced and counted at a time), and
/// the transport's `Mcp-Method` / `Mcp-Name` headers, where sent, must say what the body
/// says: a server that routes by header must not run what the rules never judged.
pub fn message(req: &RequestView<'_>, body: &Body) -> Result<Message, Denial> {
    let (method, headers) = (req.method, req.headers);
    if method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("DELETE") {
        // A body there could carry a message no rule, price or limit saw.
        let bodiless = matches!(body, Body::Empty) || req.body.is_some_and(<[u8]>::is_empty);
        return match bodiless {
            true => Ok(Message::None),
            false => Err(Denial::InvalidRequest(
                "GET and DELETE to an MCP server carry no body",
            )),
        };
    }
    if !method.eq_ignore_ascii_case("POST") {
        return Err(Denial::InvalidRequest(
            "an MCP server takes POST, GET and DELETE",
        ));
    }
    let json = match body {
        Body::Unread => return Ok(Message::NeedBody),
        Body::Json(json) => json,
        Body::TooLarge(limit) => return Err(Denial::BodyTooLarge(*limit)),
        Body::Empty | Body::Unjudgeable(_) => {
            return Err(Denial::InvalidRequest(
                "an MCP message is one JSON-RPC object sent as application/json (no batches)",
            ));
        }
    };
    let rpc_method = name(
        json.get("method"),
        "the JSON-RPC method is not a string of at most 128 printable characters",
    )?;
    let tool = match rpc_method {
        Some("tools/call") => Some(
            name(
                json.pointer("/params/name"),
                "the tool name is not a string of at most 128 printable characters",
            )?
            .ok_or(Denial::InvalidRequest("tools/call names no tool"))?,
        ),
        _ => None,
    };
    for (header, body_says) in [("mcp-method", rpc_method), ("mcp-name", tool)] {
        let mut sent = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(header));
        let (first, second) = (sent.next(), sent.next());
        let agrees = match (first, body_says) {
            (None, _) => true,
            (Some((_, value)), Some(said)) => second.is_none() && *value == said.as_bytes(),
            // A name header on a message that names nothing is left to the server.
            (Some(_), None) => header == "mcp-name" && second.is_none(),
        };
        if !agrees {
            return Err(Denial::InvalidRequest(
                "the Mcp-Method or Mcp-Name header differs from the message",
            ));
        }
    }
    let id = json.get("id").cloned();
    Ok(Message::Call(Call {
        method: rpc_method.map(Into::into),
        tool: tool.map(Into::into),
        id: rpc_method.and(id),
    }))
}

/// What is known of a message that cannot be read: at most the id it answers.
pub fn unreadable(body: &Body) -> Call {
    let id = match body {
        Body::Json(json) => json.get("id").filter(|id| id.is_string() || id.is_number()),
        _ => None,
    };
    Call {
        method: None,
        tool: None,
        id: id.cloned(),
    }
}

/// A string field, if there is one; anything else where a name goes is refused, and so
/// is a name too long for the audit to keep whole or with control characters in it
/// (which would steer the terminal of whoever reads the log).
fn name<'j>(
    v: Option<&'j serde_json::Value>,
    what: &'static str,
) -> Result<Option<&'j str>, Denial> {
    match v {
        None => Ok(None),
        Some(serde_json::Value::String(s))
            if s.len() <= MAX_NAME && !s.chars().any(char::is_control) =>
        {
            Ok(Some(s.as_str()))
        }
        Some(_) => Err(Denial::InvalidRequest(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(headers: &[(&str, &[u8])], body: serde_json::Value) -> Result<Message, Denial> {
        let bytes = body.to_string();
        let parsed = Body::parse(bytes.as_bytes(), Some(b"application/json"));
        message(&post(headers, &bytes), &parsed)
    }

    proptest::proptest! {
        /// Whatever JSON an agent posts, reading it never panics, and a message read as
        /// a tool call names the tool its body names, with any `Mcp-Name` agreeing.
        #[test]
        fn hostile_messages_read_as_they_are(
            body in "\\{(\"(method|params|name|id|jsonrpc|Method)\":(\"tools/call\"|\"x\"|1|null|\\[\\]|\\{\"name\":(\"t\"|2|null)\\}),?){0,5}\\}",
            header in proptest::option::of("(t|x|tools/call)"),
        ) {
            let headers: Vec<(&str, &[u8])> = header.iter().map(|h| ("mcp-name", h.as_bytes())).collect();
            let parsed = Body::parse(body.as_bytes(), Some(b"application/json"));
            if let Ok(Message::Call(call)) = message(&post(&headers, &body), &parsed) {
                let Body::Json(json) = &parsed else { panic!("a call from a JSON body") };
                if call.method.as_deref() == Some("tools/call") {
                    proptest::prop_assert_eq!(call.tool.as_deref(), json.pointer("/params/name").and_then(|v| v.as_str()));
                    if let Some(h) = &header {
                        proptest::prop_assert_eq!(Some(h.as_str()), call.tool.as_deref());
                    }
                }
            }
        }
    }

    fn post<'a>(headers: &'a [(&'a str, &'a [u8])], body: &'a str) -> RequestView<'a> {
        RequestView {
            method: "POST",
            path: "/mcp",
            headers,
            body: Some(body.as_bytes()),
        }
    }

    #[test]
    fn a_tool_call_is_read_with_its_id() {
        let m = read(
            &[],
            json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{}}}),
        )
        .unwrap();
        let Message::Call(call) = m else {
            panic!("{m:?}")
        };
        assert_eq!(call.method.as_deref(), Some("tools/call"));
        assert_eq!(call.tool.as_deref(), Some("search"));
        assert_eq!(call.id, Some(json!(7)));
        let get = RequestView {
            method: "GET",
            ..post(&[], "")
        };
        assert!(matches!(
            message(&get, &Body::Empty).unwrap(),
            Message::None
        ));
        let with_body = RequestView { body: None, ..get };
        assert!(message(&with_body, &Body::Unread).is_err());
        let put = RequestView {
            method: "PUT",
            ..get
        };
        assert!(message(&put, &Body::Empty).is_err());
    }

    #[test]
    fn what_cannot_be_judged_is_refused() {
        let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}});
        for (headers, body) in [
            (vec![], json!([call.clone()])),
            (
                vec![],
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}),
            ),
            (
                vec![],
                json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}),
            ),
            (
                vec![],
                json!({"jsonrpc":"2.0","id":1,"method":["tools/call"]}),
            ),
            (vec![("mcp-name", b"other".as_slice())], call.clone()),
            (vec![("mcp-method", b"tools/list".as_slice())], call.clone()),
            (
                vec![
                    ("mcp-name", b"search".as_slice()),
                    ("mcp-name", b"x".as_slice()),
                ],
                call.clone(),
            ),
        ] {
            assert!(
                matches!(read(&headers, body.clone()), Err(Denial::InvalidRequest(_))),
                "{headers:?} {body}"
            );
        }
        let agreeing = [
            ("mcp-method", b"tools/call".as_slice()),
            ("mcp-name", b"search".as_slice()),
        ];
        assert!(read(&agreeing, call).is_ok());
        let text = Body::parse(b"{}", Some(b"text/plain"));
        assert!(message(&post(&[], "{}"), &text).is_err());
        let long = "x".repeat(129);
        let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":long}});
        assert!(read(&[], body).is_err());
        let body =
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\u{1b}[2Jb"}});
        assert!(read(&[], body).is_err());
    }
}
