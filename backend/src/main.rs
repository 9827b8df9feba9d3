//! `mcp-backend`: parses flags, loads the configuration, starts logging, serves.

use std::path::PathBuf;

use anyhow::Context;
use backend::config::FileConfig;
use clap::Parser;

/// MCP server whose sessions live in Redis, so any replica serves any session.
#[derive(Debug, Parser)]
#[command(name = "mcp-backend", version)]
struct Cli {
    /// YAML configuration file (see conf/backend.yaml). Env vars and flags override it.
    #[arg(short = 'c', long = "config", env = "MCP_BACKEND_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    test: bool,
    /// Listen port (overrides PORT and the file).
    #[arg(long)]
    port: Option<u16>,
    /// Listen address (overrides HOST and the file).
    #[arg(long)]
    host: Option<String>,
    /// Redis URL (overrides REDIS_URL and the file); without one, sessions live in memory.
    #[arg(long)]
    redis_url: Option<String>,
    /// Node id reported in /health and system://info (overrides NODE_ID).
    #[arg(long)]
    node_id: Option<String>,
    /// Also serve the fixtures of the official MCP conformance suite.
    #[arg(long)]
    conformance: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    file.apply_env(|k| std::env::var(k).ok())?;
    if cli.port.is_some() {
        file.port = cli.port;
    }
    if cli.host.is_some() {
        file.host = cli.host.clone();
    }
    if cli.redis_url.is_some() {
        file.redis_url = cli.redis_url.clone();
    }
    if cli.node_id.is_some() {
        file.node_id = cli.node_id.clone();
    }
    if cli.conformance {
        file.conformance = Some(true);
    }
    let config = file.validate()?;
    if cli.test {
        // The Redis URL may carry a password: never print it.
        let mut shown = config.clone();
        if let Some(redis) = &mut shown.redis {
            redis.redact();
        }
        println!("configuration ok: {shown:#?}");
        return Ok(());
    }
    // Behind the proxy, a request's traceparent is the proxy's: continued by default.
    let telemetry = telemetry::init(
        &config.telemetry,
        "mcp-backend",
        &config.node_id,
        true,
        "info,rmcp=warn",
    )?;
    let exporter = std::sync::Arc::new(telemetry.tracing);
    backend::trace::set(exporter.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!(
            listen = %config.listen,
            node_id = %config.node_id,
            store = config
                .redis
                .as_ref()
                .map_or_else(|| "memory".to_owned(), |r| format!("redis: {}", r.describe())),
            "mcp-backend ready"
        );
        if config.principal_secret.is_none() {
            tracing::warn!(
                "no principal_secret: callers are anonymous and sessions are not bound to a principal; set it (the same value as the proxy's) behind an authenticating mcp-proxy"
            );
        }
        backend::run(config, listener, shutdown_signal()).await?;
        Ok(())
    });
    // Send the spans and log lines still buffered before leaving.
    exporter.shutdown();
    drop(telemetry.logs);
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
