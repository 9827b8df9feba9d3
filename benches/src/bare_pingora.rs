//! bench-pingora: a bare Pingora proxy, the baseline mcp-proxy is measured against first.
//!
//! The smallest `ProxyHttp` that routes like the other benchmark targets: `GET /mcp` by the
//! client's address (every benchmark client is 127.0.0.1, so one upstream, as nginx's and
//! HAProxy's address hash), everything else round-robin. No filters, no health checks, no logs,
//! and Pingora's defaults for everything but `threads` (so work stealing stays on, unlike in the
//! benchmark config of mcp-proxy). The system allocator, not mcp-proxy's mimalloc: bare means
//! defaults. What mcp-proxy costs over this is the cost of its own code.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[derive(Parser)]
#[command(about = "A bare Pingora proxy (no filters, Pingora defaults) for the benchmarks")]
struct Args {
    /// host:port to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// An upstream host:port (repeatable).
    #[arg(long, required = true)]
    upstream: Vec<SocketAddr>,
    /// Pingora worker threads (`ServerConf::threads`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Bare {
    peers: Vec<HttpPeer>,
    next: AtomicUsize,
    hasher: RandomState,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let req = session.req_header();
        let i = if req.method == "GET" && req.uri.path() == "/mcp" {
            let client = session.client_addr().and_then(|a| a.as_inet());
            self.hasher.hash_one(client.map(|a| a.ip())) as usize
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        Ok(Box::new(self.peers[i % self.peers.len()].clone()))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let bare = Bare {
        peers: (args.upstream.iter())
            .map(|a| HttpPeer::new(*a, false, String::new()))
            .collect(),
        next: AtomicUsize::new(0),
        hasher: RandomState::new(),
    };
    let mut service = http_proxy_service(&server.configuration, bare);
    service.add_tcp(&args.listen.to_string());
    server.add_service(service);
    server.run_forever()
}
