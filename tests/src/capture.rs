//! A fake upstream that records the headers of every request it gets: `POST` answers a
//! JSON-RPC result, `GET` an SSE stream that writes as fast as the connection takes it (to
//! fill a client's buffers). It tells what the proxy forwards and when it lets go of a stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::HeaderMap;

#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<(String, HeaderMap)>>,
    /// GET streams open right now.
    open_streams: AtomicUsize,
}

pub struct Capture {
    pub port: u16,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts an open stream until dropped (the proxy closed the upstream request).
struct Open(Arc<Seen>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Capture {
    pub async fn start() -> Result<Self> {
        let seen = Arc::new(Seen::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let s = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let s = s.clone();
            async move {
                let path = req.uri().path().to_owned();
                if let Ok(mut r) = s.requests.lock() {
                    r.push((path.clone(), req.headers().clone()));
                }
                if req.method() == http::Method::GET && path != "/health" {
                    s.open_streams.fetch_add(1, Ordering::SeqCst);
                    let open = Open(s.clone());
                    let chunk = bytes::Bytes::from(format!("data: {}\n\n", "x".repeat(16 * 1024)));
                    let stream =
                        futures::stream::unfold((open, chunk), |(open, chunk)| async move {
                            Some((Ok::<_, std::io::Error>(chunk.clone()), (open, chunk)))
                        });
                    return Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(stream))
                        .unwrap_or_default();
                }
                Response::builder()
                    .header("content-type", "application/json")
                    .header("mcp-session-id", "capture-session")
                    .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#))
                    .unwrap_or_default()
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, seen, task })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Path and headers of every request so far, health checks left out.
    pub fn requests(&self) -> Vec<(String, HeaderMap)> {
        self.seen
            .requests
            .lock()
            .map(|r| r.iter().filter(|(p, _)| p != "/health").cloned().collect())
            .unwrap_or_default()
    }

    pub fn open_streams(&self) -> usize {
        self.seen.open_streams.load(Ordering::SeqCst)
    }
}

/// An upstream whose health check passes and that answers every other request with 500 and a
/// JSON-RPC error: a broken server that its `/health` does not give away.
pub struct Failing {
    pub port: u16,
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Failing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Failing {
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let c = c.clone();
            async move {
                if req.uri().path() == "/health" {
                    return Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from(r#"{"status":"healthy"}"#))
                        .unwrap_or_default();
                }
                c.fetch_add(1, Ordering::SeqCst);
                Response::builder()
                    .status(500)
                    .header("content-type", "application/json")
                    .body(Body::from(
                        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"broken"}}"#,
                    ))
                    .unwrap_or_default()
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, calls, task })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
