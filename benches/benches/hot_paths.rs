//! Criterion micro benchmarks of the per-request hot paths: backend selection per policy,
//! MCP header and body parsing in the proxy, and the backend's session record and event codec.
//! `cargo bench -p benches` runs them; the load benchmarks are `benches/run`.

// Fixed inputs built at start: a benchmark whose fixture does not build must stop loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use proxy::config::Config;
use proxy::pins::Pins;
use proxy::pool::Pool;
use rmcp::model::{InitializeRequestParams, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::ServerSseMessage;
use serde_json::json;

const CONFIG: &str = "
listeners: [{address: 127.0.0.1:18080}]
pools:
  - name: mcp
    backends:
      - {address: 127.0.0.1:13001}
      - {address: 127.0.0.1:13002}
      - {address: 127.0.0.1:13003}
";

const SESSION: &str = "4f1c2a8e-6b1d-4a7e-9c3f-2d5b8e0a7c61";

fn pool() -> Pool {
    let config = Config::parse(CONFIG, "bench").expect("bench config parses");
    Pool::new(config.pools[0].clone(), None)
}

fn selection(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("select");
    g.bench_function("round-robin", |b| {
        b.iter(|| black_box(pool.round_robin(&[])))
    });
    g.bench_function("ip-hash", |b| {
        let ip = b"127.0.0.1";
        b.iter(|| black_box(pool.hash(black_box(ip), &[])))
    });
    g.bench_function("session-hash", |b| {
        b.iter(|| black_box(pool.hash(black_box(SESSION.as_bytes()), &[])))
    });
    g.bench_function("session-hash, one backend excluded", |b| {
        b.iter(|| black_box(pool.hash(black_box(SESSION.as_bytes()), &[1])))
    });
    let pins = Pins::new(100_000);
    for i in 0..10_000 {
        pins.insert(
            &format!("session-{i}"),
            "mcp",
            "127.0.0.1:13002",
            Duration::from_secs(3600),
        );
    }
    pins.insert(SESSION, "mcp", "127.0.0.1:13002", Duration::from_secs(3600));
    g.bench_function("persistence lookup (10k pins)", |b| {
        b.iter(|| black_box(pins.get(black_box(SESSION))))
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.bench_function("Mcp-Session-Id", |b| {
        b.iter(|| black_box(proxy::mcp::session_id(black_box(SESSION.as_bytes()), 256)))
    });
    g.bench_function("MCP-Protocol-Version", |b| {
        b.iter(|| black_box(proxy::mcp::protocol_version(black_box(b"2025-11-25"))))
    });
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"message": "hello"}}})
    .to_string();
    g.bench_function("JSON-RPC body peek (tools/call)", |b| {
        b.iter(|| black_box(proxy::mcp::peek(black_box(body.as_bytes()))))
    });
    let stream_start =
        b"event: endpoint\ndata: /messages?sessionId=4f1c2a8e-6b1d-4a7e-9c3f-2d5b8e0a7c61\n\n";
    g.bench_function("legacy endpoint event", |b| {
        b.iter(|| black_box(proxy::mcp::endpoint_session(black_box(stream_start))))
    });
    g.finish();
}

fn session_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("session record");
    let init: InitializeRequestParams = serde_json::from_value(json!({
        "protocolVersion": "2025-11-25",
        "capabilities": {"elicitation": {}, "sampling": {}, "roots": {"listChanged": true}},
        "clientInfo": {"name": "bench-client", "version": "1.0.0"}
    }))
    .expect("initialize params");
    let encoded = serde_json::to_string(&init).expect("encode");
    g.bench_function("initialize params encode", |b| {
        b.iter(|| black_box(serde_json::to_string(black_box(&init))))
    });
    g.bench_function("initialize params decode", |b| {
        b.iter(|| {
            black_box(serde_json::from_str::<InitializeRequestParams>(black_box(
                &encoded,
            )))
        })
    });
    let message: ServerJsonRpcMessage = serde_json::from_value(json!({
        "jsonrpc": "2.0", "id": 7,
        "result": {"content": [{"type": "text", "text": "hello"}], "isError": false}
    }))
    .expect("server message");
    let mut event = ServerSseMessage::default();
    event.message = Some(Arc::new(message));
    let payload = backend::sessions::encode_event(&event).expect("encode event");
    g.bench_function("event encode", |b| {
        b.iter(|| black_box(backend::sessions::encode_event(black_box(&event))))
    });
    g.bench_function("event decode", |b| {
        b.iter(|| {
            black_box(backend::sessions::decode_event(
                "post-7",
                "1700000000000-0",
                black_box(&payload),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, selection, parsing, session_record);
criterion_main!(benches);
