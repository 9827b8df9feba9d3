//! What the proxy reads of an MCP request: the `Mcp-Session-Id` and `MCP-Protocol-Version`
//! headers, the JSON-RPC method and id of a small POST body, and the session id of a 2024-11-05
//! `endpoint` event. Also the JSON-RPC error bodies the proxy answers with itself.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

/// The first protocol revision without sessions: its requests without a session id go
/// round-robin whatever the pool's policy.
pub const STATELESS_REVISION: &str = "2026-07-28";

/// Why a header was refused; the message is what the client reads.
#[derive(Debug, PartialEq, Eq)]
pub struct BadHeader(pub &'static str);

/// `Mcp-Session-Id` must be visible ASCII (0x21..=0x7E), non-empty and at most `max` bytes.
pub fn session_id(value: &[u8], max: usize) -> Result<&str, BadHeader> {
    if value.is_empty() {
        return Err(BadHeader("empty Mcp-Session-Id header"));
    }
    if value.len() > max {
        return Err(BadHeader("Mcp-Session-Id header too long"));
    }
    if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(BadHeader(
            "Mcp-Session-Id header must be visible ASCII characters only",
        ));
    }
    std::str::from_utf8(value).map_err(|_| BadHeader("Mcp-Session-Id header is not ASCII"))
}

/// `MCP-Protocol-Version` must be short visible ASCII. Whether the revision is supported is
/// the backend's call (it answers with the versions it supports), so any such value passes.
/// Returns whether the request is of a session-less revision (2026-07-28 or later).
pub fn protocol_version(value: &[u8]) -> Result<bool, BadHeader> {
    if value.is_empty() || value.len() > 64 || !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(BadHeader(
            "MCP-Protocol-Version header must be up to 64 visible ASCII characters",
        ));
    }
    let is_date = value.len() == 10
        && value.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    Ok(is_date && value >= STATELESS_REVISION.as_bytes())
}

/// The method and id of a JSON-RPC message, read without building a full JSON tree.
#[derive(Debug, Default, PartialEq)]
pub struct Peek {
    pub method: Option<String>,
    /// The `id`, echoed in errors the proxy answers itself.
    pub id: Option<Value>,
    /// A JSON array: a 2025-03-26 batch. Never safe to repeat as a whole.
    pub batch: bool,
    /// The tool of a `tools/call` (its `params.name`).
    pub tool: Option<String>,
    /// What the request names, for traces: the tool or prompt (`params.name`) or the resource
    /// (`params.uri`). Client-chosen: never a metrics label.
    pub target: Option<String>,
    /// Read from `Mcp-Method` / `Mcp-Name` instead of the body (`id` is then read only when
    /// the proxy answers an error itself).
    pub from_headers: bool,
}

/// `Mcp-Method`, when present once and well formed (visible ASCII, at most 128 bytes).
pub fn method_header(headers: &http::HeaderMap) -> Option<String> {
    let mut values = headers.get_all("mcp-method").iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return None;
    };
    let b = v.as_bytes();
    (!b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()))
        .then(|| String::from_utf8_lossy(b).into_owned())
}

impl Peek {
    /// A 2026-07-28 request: the method from `Mcp-Method`, the tool, prompt or resource from
    /// `Mcp-Name`. The backend refuses a request whose headers and body disagree (-32020),
    /// so these are what it runs.
    pub fn from_headers(method: &str, headers: &http::HeaderMap) -> Self {
        let name = headers
            .get("mcp-name")
            .and_then(|v| v.to_str().ok())
            .map(|n| truncate(n, 256).to_owned());
        Peek {
            tool: name.clone().filter(|_| method == "tools/call"),
            target: name,
            method: Some(method.to_owned()),
            id: None,
            batch: false,
            from_headers: true,
        }
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    uri: Option<std::borrow::Cow<'a, str>>,
}

/// Reads the method and id of a POST body. Bodies that are not JSON-RPC give an empty
/// [`Peek`]: the backend answers them with the proper error.
pub fn peek(body: &[u8]) -> Peek {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        return Peek {
            batch: true,
            ..Peek::default()
        };
    }
    match serde_json::from_slice::<Message>(body) {
        Ok(m) => {
            let method = m.method.as_deref();
            let (name, uri) = m.params.map_or((None, None), |p| (p.name, p.uri));
            let target = match method {
                Some("tools/call" | "prompts/get") => name.as_deref(),
                Some(m) if m.starts_with("resources/") => uri.as_deref(),
                _ => None,
            };
            Peek {
                target: target.map(|t| truncate(t, 256).to_owned()),
                tool: name
                    .filter(|_| method == Some("tools/call"))
                    .map(|n| n.into_owned()),
                method: m.method.map(|m| m.into_owned()),
                id: m.id,
                batch: false,
                from_headers: false,
            }
        }
        Err(_) => Peek::default(),
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounded label for metrics: known MCP methods as themselves, anything else "other".
pub fn method_label(method: Option<&str>) -> &'static str {
    method.map_or("-", telemetry::method_label)
}

/// Finds the session id in the first `endpoint` event of a 2024-11-05 SSE stream
/// (`event: endpoint` / `data: /messages?sessionId=...`). `None` until the event is complete.
pub fn endpoint_session(stream_start: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(stream_start).ok()?;
    let normalized = text.replace("\r\n", "\n");
    let mut events: Vec<&str> = normalized.split("\n\n").collect();
    events.pop(); // what follows the last blank line: an event not yet complete
    for event in events {
        let mut is_endpoint = false;
        let mut data = None;
        for line in event.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                is_endpoint = v.trim() == "endpoint";
            } else if let Some(v) = line.strip_prefix("data:") {
                data = Some(v.trim().to_owned());
            }
        }
        if is_endpoint {
            return data.as_deref().and_then(query_session_id);
        }
    }
    None
}

/// The chunk with the first 2024-11-05 `endpoint` event's absolute path (`data: /messages...`)
/// given the route's `prefix`, so that the client posts back through the same route; `None`
/// when the chunk has no such line.
pub fn prefix_endpoint(chunk: &[u8], prefix: &str) -> Option<Bytes> {
    let at = chunk
        .windows(6)
        .position(|w| w == b"data: " || w.starts_with(b"data:/"))?;
    let value = at + if chunk[at + 5] == b' ' { 6 } else { 5 };
    if chunk.get(value) != Some(&b'/') {
        return None;
    }
    let mut out = Vec::with_capacity(chunk.len() + prefix.len());
    out.extend_from_slice(&chunk[..value]);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(&chunk[value..]);
    Some(Bytes::from(out))
}

/// The `sessionId` query parameter of a URI or query string.
pub fn query_session_id(uri: &str) -> Option<String> {
    let query = uri.split_once('?').map_or(uri, |(_, q)| q);
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sessionId="))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        .map(str::to_owned)
}

/// A JSON-RPC error response body; `id` is `null` when unknown.
/// The top-level shape of a JSON-RPC message, every value skipped.
#[derive(Deserialize)]
struct Shape {
    #[serde(default)]
    method: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    result: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

/// Whether `json` is a JSON-RPC response (a result or an error, not a request or
/// notification): the end of a POST's answer.
pub fn is_response(json: &[u8]) -> bool {
    serde_json::from_slice::<Shape>(json)
        .is_ok_and(|m| m.method.is_none() && (m.result.is_some() || m.error.is_some()))
}

/// The `data` of one SSE event (its `data:` lines joined by `\n`), if any.
pub fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            match &mut data {
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
                None => data = Some(v.to_vec()),
            }
        }
    }
    data
}

/// The JSON-RPC messages of an answer body: the body itself when it is JSON, else the data of
/// each SSE event.
pub fn messages(body: &[u8]) -> Vec<Vec<u8>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        return vec![body.to_vec()];
    }
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|e| event_data(e.as_bytes()))
        .collect()
}

/// The tools of a `tools/list` answer (a JSON body or SSE events) with whether their
/// annotations say a call may be repeated: `readOnlyHint` or `idempotentHint` true.
pub fn tool_hints(body: &[u8]) -> Vec<(String, bool)> {
    #[derive(Deserialize)]
    struct Answer {
        result: Option<Listed>,
    }
    #[derive(Deserialize)]
    struct Listed {
        #[serde(default)]
        tools: Vec<ToolEntry>,
    }
    #[derive(Deserialize)]
    struct ToolEntry {
        name: String,
        #[serde(default)]
        annotations: Option<Hints>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Hints {
        #[serde(default)]
        read_only_hint: Option<bool>,
        #[serde(default)]
        idempotent_hint: Option<bool>,
    }
    messages(body)
        .iter()
        .filter_map(|m| serde_json::from_slice::<Answer>(m).ok()?.result)
        .flat_map(|l| l.tools)
        .map(|t| {
            let h = t.annotations;
            let safe = h
                .as_ref()
                .is_some_and(|h| h.read_only_hint == Some(true) || h.idempotent_hint == Some(true));
            (t.name, safe)
        })
        .collect()
}

pub fn error_body(id: Option<&Value>, code: i32, message: &str) -> Bytes {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.unwrap_or(&Value::Null),
        "error": {"code": code, "message": message},
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_headers_replace_the_body_parse() {
        let mut h = http::HeaderMap::new();
        assert_eq!(method_header(&h), None);
        h.insert("mcp-method", http::HeaderValue::from_static("tools/call"));
        h.insert("mcp-name", http::HeaderValue::from_static("echo"));
        let m = method_header(&h).unwrap();
        let p = Peek::from_headers(&m, &h);
        assert_eq!(p.method.as_deref(), Some("tools/call"));
        assert_eq!(p.tool.as_deref(), Some("echo"));
        assert!(p.from_headers && p.id.is_none());
        h.append("mcp-method", http::HeaderValue::from_static("ping"));
        assert_eq!(method_header(&h), None, "two values: not trusted");
        h.remove("mcp-method");
        h.insert("mcp-method", http::HeaderValue::from_static(""));
        assert_eq!(method_header(&h), None);
    }

    #[test]
    fn responses_tool_names_and_hints_are_read() {
        assert!(is_response(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#));
        assert!(is_response(
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}"#
        ));
        assert!(!is_response(
            br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"result":1}}"#
        ));
        assert!(!is_response(
            br#"{"jsonrpc":"2.0","id":"t-0","method":"elicitation/create"}"#
        ));
        assert!(!is_response(b"not json"));
        let p = peek(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#);
        assert_eq!(p.tool.as_deref(), Some("echo"));
        let p = peek(br#"{"jsonrpc":"2.0","id":3,"method":"prompts/get","params":{"name":"x"}}"#);
        assert_eq!(p.tool, None, "only tools/call names a tool");
        let listed = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"echo","annotations":{"readOnlyHint":true}},{"name":"put","annotations":{"idempotentHint":true}},{"name":"counter"},{"name":"rm","annotations":{"readOnlyHint":false}}]}}"#;
        let expect = vec![
            ("echo".to_owned(), true),
            ("put".to_owned(), true),
            ("counter".to_owned(), false),
            ("rm".to_owned(), false),
        ];
        assert_eq!(tool_hints(listed.as_bytes()), expect, "JSON body");
        let sse =
            format!("id: s/0-0\ndata: \n\nevent: message\r\nid: s/1-0\r\ndata: {listed}\r\n\r\n");
        assert_eq!(tool_hints(sse.as_bytes()), expect, "SSE body");
        assert_eq!(event_data(b"data: a\ndata: b\n"), Some(b"a\nb".to_vec()));
    }

    #[test]
    fn session_ids_must_be_visible_ascii_and_bounded() {
        assert_eq!(session_id(b"abc-123", 16), Ok("abc-123"));
        assert!(session_id(b"", 16).is_err());
        assert!(session_id(b"has space", 16).is_err());
        assert!(session_id("caf\u{e9}".as_bytes(), 16).is_err());
        assert!(session_id(b"a\x7f", 16).is_err());
        assert!(session_id(&[b'a'; 17], 16).is_err());
    }

    #[test]
    fn protocol_versions_pass_unless_malformed_and_tell_the_stateless_revisions() {
        assert_eq!(protocol_version(b"2025-11-25"), Ok(false));
        assert_eq!(protocol_version(b"2026-07-28"), Ok(true));
        assert_eq!(protocol_version(b"2027-01-01"), Ok(true));
        assert_eq!(
            protocol_version(b"DRAFT-2026-v1"),
            Ok(false),
            "the backend decides"
        );
        assert!(protocol_version(b"").is_err());
        assert!(protocol_version(b"a b").is_err());
        assert!(protocol_version(&[b'1'; 65]).is_err());
    }

    #[test]
    fn peeking_reads_method_and_raw_id() {
        let p = peek(br#"{"jsonrpc":"2.0","id":"x-1","method":"tools/call","params":{"a":[1,2]}}"#);
        assert_eq!(p.method.as_deref(), Some("tools/call"));
        assert_eq!(p.id, Some(Value::from("x-1")));
        let p = peek(br#" [{"jsonrpc":"2.0","id":1,"method":"ping"}]"#);
        assert!(p.batch && p.method.is_none());
        assert_eq!(peek(b"{not json"), Peek::default());
        let p = peek(br#"{"jsonrpc":"2.0","id":12345678901234567890,"result":{}}"#);
        assert_eq!(p.method, None);
        assert_eq!(p.id, Some(Value::from(12345678901234567890u64)));
        let p = peek(br#"{"method":"tools\/list","id":2}"#);
        assert_eq!(p.method.as_deref(), Some("tools/list"));
    }

    #[test]
    fn error_bodies_echo_the_id_verbatim() {
        let id = Value::from(12345678901234567890u64);
        let b = error_body(Some(&id), -32000, "no healthy backend");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], -32000);
        assert!(
            std::str::from_utf8(&b)
                .unwrap()
                .contains("\"id\":12345678901234567890")
        );
        let v: serde_json::Value = serde_json::from_slice(&error_body(None, -1, "x")).unwrap();
        assert!(v["id"].is_null());
    }

    #[test]
    fn endpoint_events_get_the_route_prefix() {
        let got = prefix_endpoint(b"event: endpoint\ndata: /messages?sessionId=a\n\n", "/gh");
        assert_eq!(
            got.as_deref(),
            Some(&b"event: endpoint\ndata: /gh/messages?sessionId=a\n\n"[..])
        );
        let got = prefix_endpoint(b"event: endpoint\ndata:/messages?sessionId=a\n\n", "/gh");
        assert_eq!(
            got.as_deref(),
            Some(&b"event: endpoint\ndata:/gh/messages?sessionId=a\n\n"[..])
        );
        assert_eq!(prefix_endpoint(b": keep-alive\n\n", "/gh"), None);
        assert_eq!(prefix_endpoint(b"data: http://x/messages", "/gh"), None);
    }

    #[test]
    fn the_endpoint_event_names_the_legacy_session() {
        assert_eq!(
            endpoint_session(b"event: endpoint\ndata: /messages?sessionId=abc\n\n"),
            Some("abc".into())
        );
        assert_eq!(
            endpoint_session(
                b": hi\r\n\r\nevent: endpoint\r\ndata: /messages?x=1&sessionId=q9\r\n\r\n"
            ),
            Some("q9".into())
        );
        assert_eq!(
            endpoint_session(b"event: endpoint\ndata: /messages?sessionId=abc"),
            None
        );
        assert_eq!(method_label(Some("tools/call")), "tools/call");
        assert_eq!(method_label(Some("x/evil{label}")), "other");
        assert_eq!(method_label(None), "-");
    }
}
