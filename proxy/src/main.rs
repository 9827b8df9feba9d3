//! `mcp-proxy -c FILE` or `mcp-proxy --listen ADDR --backend ADDR [--backend ADDR ...]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use proxy::config::Config;

// Pingora allocates and frees 64 KiB body buffers, headers and tasks on every request. Measured
// with benches/run: a 64 KiB response cost about 99 us of proxy CPU with glibc malloc and 51 us
// with mimalloc; an idle SSE stream 61 KiB and 55 KiB. Transparent huge pages are off for
// mimalloc (`no_thp`): with them an idle stream cost about 180 KiB of RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An edge load balancer for MCP servers, built on Pingora.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The YAML configuration file (see conf/proxy.yaml).
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    conf: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(short = 't', long)]
    test: bool,
    /// Without a file: an address to listen on (repeatable).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Without a file: a backend address (repeatable).
    #[arg(long, value_name = "ADDR")]
    backend: Vec<String>,
    /// Without a file: the admin listener address (health, metrics, admin API).
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Without a file: the backends share sessions and resume each other's streams
    /// (mcp-backend replicas on one Redis), as `shared_sessions: true` in a file.
    #[arg(long)]
    shared_sessions: bool,
    /// Take over the listeners of a running mcp-proxy (graceful upgrade; then SIGQUIT the old one).
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Run in the background.
    #[arg(short = 'd', long)]
    daemon: bool,
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    match &cli.conf {
        Some(path) => {
            if !cli.listen.is_empty()
                || !cli.backend.is_empty()
                || cli.admin.is_some()
                || cli.shared_sessions
            {
                anyhow::bail!(
                    "--listen, --backend, --admin and --shared-sessions cannot be combined with -c; put them in the file"
                );
            }
            Ok(Config::load(path)?)
        }
        None => {
            if cli.listen.is_empty() || cli.backend.is_empty() {
                anyhow::bail!("give -c FILE, or --listen ADDR with at least one --backend ADDR");
            }
            let mut config = Config::from_cli(&cli.listen, &cli.backend, cli.admin.as_deref())?;
            for pool in &mut config.pools {
                pool.shared_sessions = cli.shared_sessions;
            }
            Ok(config)
        }
    }
}

/// This proxy's name in logs and traces: `NODE_ID`, else the host name.
fn node_id() -> String {
    std::env::var("NODE_ID")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "mcp-proxy".to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcp-proxy: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if cli.test {
        let backends: usize = config.pools.iter().map(|p| p.backends.len()).sum();
        println!(
            "mcp-proxy: configuration OK: {} listener(s), {} pool(s), {} backend(s)",
            config.listeners.len(),
            config.pools.len(),
            backends
        );
        return ExitCode::SUCCESS;
    }
    let node = node_id();
    // The proxy is the edge: a client's traceparent is linked, not continued, unless
    // `telemetry.trust_traceparent` says so.
    let telemetry = match telemetry::init(&config.telemetry, "mcp-proxy", &node, false, "info") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("mcp-proxy: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let listeners: Vec<String> = config
        .listeners
        .iter()
        .map(|l| l.address.to_string())
        .collect();
    let admin = config.admin.as_ref().map(|a| a.address.to_string());
    let options = proxy::StartOptions {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
    };
    let exporter = std::sync::Arc::new(telemetry.tracing);
    match proxy::server(config, options) {
        Ok((server, shared)) => {
            shared.set_tracing(exporter.clone());
            shared.metrics.set_log_drops(telemetry.logs.drops());
            tracing::info!(listeners = ?listeners, admin = ?admin, node, "mcp-proxy starting");
            server.run(pingora::server::RunArgs::default());
            // Send the spans and log lines still buffered before leaving.
            exporter.shutdown();
            drop(telemetry.logs);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mcp-proxy: error: {e}");
            ExitCode::from(1)
        }
    }
}
