//! bench-upstream: the minimal fast upstream the load benchmarks proxy to.
//!
//! HTTP/1.1 with keep-alive, on hyper directly, so that the upstream costs as little as possible
//! and the proxy's own cost shows. Routes (any other path answers the small reply):
//! - `GET /mcp`: a short SSE stream (three `message` events, then the end), as an MCP server
//!   answers a GET stream; `GET /mcp?hold` sends one event and then holds the stream open until
//!   the client leaves (idle-stream capacity);
//! - `/big`: a 64 KiB body;
//! - anything else: a small JSON-RPC result (about 200 bytes), after reading the request body.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(about = "A minimal fast HTTP upstream for the mcp-edge benchmarks")]
struct Args {
    /// host:port to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Tokio worker threads (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

const SMALL: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog, the quick brown fox"}],"isError":false}}"#;
const EVENT: &str = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"tick\"}}\n\n";
const BIG_BYTES: usize = 64 * 1024;

type Body = BoxBody<Bytes, Infallible>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let big = Bytes::from(vec![b'x'; BIG_BYTES]);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors under a stream-capacity test: keep serving the ones we have.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let big = big.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, big.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, big: Bytes) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if req.method() == Method::GET && path == "/mcp" {
        let hold = req.uri().query().is_some_and(|q| q.contains("hold"));
        let event = || Ok::<_, Infallible>(Frame::data(Bytes::from_static(EVENT.as_bytes())));
        let body: Body = if hold {
            BodyExt::boxed(StreamBody::new(
                futures::stream::once(async move { event() }).chain(futures::stream::pending()),
            ))
        } else {
            BodyExt::boxed(StreamBody::new(futures::stream::iter([
                event(),
                event(),
                event(),
            ])))
        };
        return Ok(response("text/event-stream", body));
    }
    if path == "/big" {
        return Ok(response("application/octet-stream", Full::new(big).boxed()));
    }
    // Read the request body so the connection stays reusable.
    let _ = req.into_body().collect().await;
    Ok(response(
        "application/json",
        Full::new(Bytes::from_static(SMALL.as_bytes())).boxed(),
    ))
}

fn response(content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
