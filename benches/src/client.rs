//! bench-client: the two benchmark clients that wrk and oha cannot be.
//!
//! - `idle`: opens N SSE streams (`GET`, `Accept: text/event-stream`), waits for each one's first
//!   event (so the stream is established end to end), prints one JSON line with the counts and
//!   then holds every stream until its standard input closes. The harness reads the proxy's
//!   memory while they are held.
//! - `restore`: the cost of a session on a replica that never saw it. For each of N sessions it
//!   initializes on one replica, then times a `ping` on another replica (which restores the
//!   session from Redis) and a second `ping` there (cached), and prints the percentiles as JSON.
//! - `sessions`: initializes N sessions round-robin over the replicas (each then makes
//!   `--calls` `tools/call`) and prints their ids, one per line (the harness's `tools/call`
//!   load uses them; `benches/state` measures what the sessions cost).
//! - `churn`: sessions coming and going at a steady pace for a while (the soak of
//!   `benches/state`): each worker opens a session, makes a few `tools/call`, then deletes every
//!   other session and abandons the rest to expire; prints the totals as JSON.
//!
//! The MCP handshake and requests are the integration harness's `McpClient`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use tests::McpClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "Benchmark clients for mcp-edge: idle SSE streams and session restore cost")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N SSE streams and hold them until stdin closes.
    Idle {
        /// host:port of the proxy (or upstream).
        #[arg(long)]
        addr: String,
        #[arg(long, default_value = "/mcp?hold")]
        path: String,
        #[arg(long)]
        count: usize,
        /// Streams being opened at once.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
    },
    /// Time requests on a replica that never saw the session, against a cached session.
    Restore {
        /// MCP endpoint URLs of the replicas (at least 2), comma-separated.
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<String>,
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
        sessions: u64,
    },
    /// Initialize N sessions round-robin over the replicas and print their ids.
    Sessions {
        /// MCP endpoint URLs of the replicas, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        replicas: Vec<String>,
        #[arg(long)]
        count: usize,
        /// `tools/call` (echo) each session makes after its initialize.
        #[arg(long, default_value_t = 0)]
        calls: usize,
    },
    /// Open, use and end or abandon sessions at a steady pace for a while.
    Churn {
        /// MCP endpoint URL (the proxy).
        #[arg(long)]
        url: String,
        #[arg(long)]
        seconds: u64,
        /// Sessions in flight at once.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// `tools/call` per session.
        #[arg(long, default_value_t = 5)]
        calls: usize,
        /// Sessions started per second, all workers together.
        #[arg(long, default_value_t = 20)]
        rate: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().command {
        Command::Idle {
            addr,
            path,
            count,
            concurrency,
        } => idle(&addr, &path, count, concurrency).await,
        Command::Restore { replicas, sessions } => restore(&replicas, sessions as usize).await,
        Command::Sessions {
            replicas,
            count,
            calls,
        } => {
            let http = reqwest::Client::new();
            for i in 0..count {
                let url = &replicas[i % replicas.len()];
                let c = session_on(&http, url).await?;
                for n in 0..calls {
                    echo(&c, url, n as i64 + 2).await?;
                }
                println!("{}", c.session.unwrap_or_default());
            }
            Ok(())
        }
        Command::Churn {
            url,
            seconds,
            workers,
            calls,
            rate,
        } => churn(&url, Duration::from_secs(seconds), workers, calls, rate).await,
    }
}

/// Sessions opened, used and ended (every other one deleted, the rest abandoned) at `rate`
/// per second by `workers` concurrent loops, for `length`.
async fn churn(url: &str, length: Duration, workers: usize, calls: usize, rate: u64) -> Result<()> {
    let http = reqwest::Client::new();
    let end = Instant::now() + length;
    let ticket = std::sync::Arc::new(Semaphore::new(0));
    // The pacer hands out one ticket per session start.
    let pacer = {
        let ticket = ticket.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
            while Instant::now() < end {
                tick.tick().await;
                ticket.add_permits(1);
            }
            ticket.close();
        })
    };
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (http, url, ticket) = (http.clone(), url.to_owned(), ticket.clone());
        tasks.push(tokio::spawn(async move {
            let (mut sessions, mut ok, mut errors) = (0u64, 0u64, 0u64);
            let mut n = w;
            while let Ok(permit) = ticket.acquire().await {
                permit.forget();
                n += workers;
                let Ok(c) = session_on(&http, &url).await else {
                    errors += 1;
                    continue;
                };
                sessions += 1;
                for i in 0..calls {
                    match echo(&c, &url, i as i64 + 2).await {
                        Ok(()) => ok += 1,
                        Err(_) => errors += 1,
                    }
                }
                if n % 2 == 0 && c.delete(&url).await.ok() != Some(200) {
                    errors += 1;
                }
            }
            (sessions, ok, errors)
        }));
    }
    let _ = pacer.await;
    let (mut sessions, mut ok, mut errors) = (0, 0, 0);
    for t in tasks {
        let (s, o, e) = t.await?;
        sessions += s;
        ok += o;
        errors += e;
    }
    println!(
        "{}",
        json!({"sessions": sessions, "calls": ok, "errors": errors})
    );
    Ok(())
}

async fn echo(c: &McpClient, url: &str, id: i64) -> Result<()> {
    c.call(
        url,
        id,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "hi"}}),
    )
    .await?
    .result(id)
    .with_context(|| format!("tools/call on {url}"))?;
    Ok(())
}

async fn idle(addr: &str, path: &str, count: usize, concurrency: usize) -> Result<()> {
    let gate = std::sync::Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let gate = gate.clone();
        let (addr, path) = (addr.to_owned(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            tokio::time::timeout(Duration::from_secs(20), open_stream(&addr, &path))
                .await
                .map_err(|_| anyhow!("timed out"))?
        }));
    }
    let mut streams = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut first_error = None;
    for t in tasks {
        match t.await.map_err(|e| anyhow!("{e}")).and_then(|r| r) {
            Ok(s) => streams.push(s),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    println!(
        "{}",
        json!({"opened": streams.len(), "errors": errors, "first_error": first_error,
               "open_ms": started.elapsed().as_millis() as u64})
    );
    // Hold until the harness closes stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(streams);
    Ok(())
}

/// Sends the GET and reads up to the end of the first event.
async fn open_stream(addr: &str, path: &str) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.context("connect")?;
    tcp.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\nMcp-Protocol-Version: 2025-11-25\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut reader = BufReader::new(&mut tcp);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.starts_with("HTTP/1.1 200") {
        bail!("status line {:?}", line.trim_end());
    }
    // Headers, then the chunked or close-delimited body up to the first blank line of an event.
    let mut in_body = false;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("stream closed before its first event");
        }
        if !in_body {
            in_body = line == "\r\n";
        } else if line.starts_with("data:") {
            break;
        }
    }
    Ok(tcp)
}

async fn restore(replicas: &[String], sessions: usize) -> Result<()> {
    if replicas.len() < 2 {
        bail!("--replicas needs at least two URLs");
    }
    let http = reqwest::Client::new();
    let mut fresh = Vec::with_capacity(sessions);
    let mut cached = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let home = &replicas[i % replicas.len()];
        let other = &replicas[(i + 1) % replicas.len()];
        let c = session_on(&http, home).await?;
        let t = Instant::now();
        ping(&c, other, 2).await?;
        fresh.push(t.elapsed());
        let t = Instant::now();
        ping(&c, other, 3).await?;
        cached.push(t.elapsed());
    }
    let (f50, f99) = percentiles(&mut fresh);
    let (c50, c99) = percentiles(&mut cached);
    println!(
        "{}",
        json!({"sessions": sessions,
               "fresh_p50_us": f50, "fresh_p99_us": f99,
               "cached_p50_us": c50, "cached_p99_us": c99})
    );
    Ok(())
}

/// A client with a session initialized on `url`, sharing `http`'s connections.
async fn session_on(http: &reqwest::Client, url: &str) -> Result<McpClient> {
    let mut c = McpClient {
        http: http.clone(),
        ..McpClient::new()
    };
    c.initialize(url, json!({}))
        .await
        .with_context(|| format!("initialize on {url}"))?;
    Ok(c)
}

async fn ping(c: &McpClient, url: &str, id: i64) -> Result<()> {
    c.call(url, id, "ping", json!({}))
        .await?
        .result(id)
        .with_context(|| format!("ping on {url}"))?;
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> (u64, u64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_micros() as u64
    };
    (at(0.50), at(0.99))
}
