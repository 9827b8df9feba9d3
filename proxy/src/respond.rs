//! Answers the proxy writes itself: JSON-RPC errors (with the request's id when it could be
//! read) and small JSON documents (health, OAuth metadata).

use bytes::Bytes;
use http::header;
use pingora::Result;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::Value;

use crate::mcp;

/// Writes a whole JSON response with `extra` headers.
pub async fn json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    for (k, v) in extra {
        resp.append_header(*k, v)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a JSON-RPC error response and closes the connection afterwards (what follows a
/// refused request on the connection is not trusted).
pub async fn rpc_error(
    session: &mut Session,
    id: Option<&Value>,
    status: u16,
    code: i32,
    message: &str,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let body = mcp::error_body(id, code, message);
    session.set_keepalive(None);
    json(session, status, body, extra).await
}
