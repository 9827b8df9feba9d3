//! Real Redis deployments on loopback for the tests: a 3-master Cluster, a Sentinel-managed
//! master with one replica and three sentinels, and a TLS server with a test CA.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::{TempDir, free_port, wait_tcp};

async fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .context("redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn server(dir: &Path, port: u16, extra: &[&str]) -> Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server")
}

async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("{what} not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dir: TempDir,
    _children: Vec<Child>,
}

impl RedisCluster {
    pub async fn start() -> Result<Self> {
        let dir = TempDir::new("redis-cluster");
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = format!("nodes-{port}.conf");
            children.push(server(
                &dir.0,
                port,
                &["--cluster-enabled", "yes", "--cluster-config-file", &conf],
            )?);
            wait_tcp(port, Duration::from_secs(10)).await?;
            ports.push(port);
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!("cluster create: {}", String::from_utf8_lossy(&out.stdout));
        }
        for &port in &ports {
            until("cluster_state:ok", Duration::from_secs(20), async || {
                cli(port, &["CLUSTER", "INFO"])
                    .await
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            })
            .await?;
        }
        Ok(Self {
            ports,
            _dir: dir,
            _children: children,
        })
    }

    /// `redis://` URLs of the masters.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Runs a command on the cluster (following redirections).
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli(self.ports[0], &all).await
    }

    /// Keys on all masters matching `pattern`.
    pub async fn keys(&self, pattern: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        for &p in &self.ports {
            let out = cli(p, &["--scan", "--pattern", pattern]).await?;
            keys.extend(out.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        }
        Ok(keys)
    }
}

/// A master, one replica and three sentinels watching them as `mymaster`.
pub struct RedisSentinel {
    pub master_port: u16,
    pub replica_port: u16,
    pub sentinel_ports: Vec<u16>,
    dir: TempDir,
    master: Option<Child>,
    _replica: Child,
    _sentinels: Vec<Child>,
}

impl RedisSentinel {
    pub const MASTER: &str = "mymaster";

    pub async fn start() -> Result<Self> {
        let dir = TempDir::new("redis-sentinel");
        let master_port = free_port();
        let master = server(&dir.0.join("."), master_port, &[])?;
        wait_tcp(master_port, Duration::from_secs(10)).await?;
        let replica_port = free_port();
        let replica_dir = dir.0.join("replica");
        std::fs::create_dir_all(&replica_dir)?;
        let replica = server(
            &replica_dir,
            replica_port,
            &["--replicaof", "127.0.0.1", &master_port.to_string()],
        )?;
        wait_tcp(replica_port, Duration::from_secs(10)).await?;
        until("replica in sync", Duration::from_secs(20), async || {
            cli(replica_port, &["INFO", "replication"])
                .await
                .is_ok_and(|i| i.contains("master_link_status:up"))
        })
        .await?;
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.0.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor {m} 127.0.0.1 {master_port} 2\nsentinel down-after-milliseconds {m} 1000\nsentinel failover-timeout {m} 5000\nsentinel parallel-syncs {m} 1\n",
                    m = Self::MASTER
                ),
            )?;
            sentinels.push(
                Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .context("cannot start redis-server --sentinel")?,
            );
            wait_tcp(port, Duration::from_secs(10)).await?;
            sentinel_ports.push(port);
        }
        for &p in &sentinel_ports {
            until(
                "sentinels see the replica",
                Duration::from_secs(30),
                async || {
                    cli(p, &["SENTINEL", "REPLICAS", Self::MASTER])
                        .await
                        .is_ok_and(|r| r.contains(&replica_port.to_string()))
                },
            )
            .await?;
        }
        Ok(Self {
            master_port,
            replica_port,
            sentinel_ports,
            dir,
            master: Some(master),
            _replica: replica,
            _sentinels: sentinels,
        })
    }

    /// `host:port` of the sentinels.
    pub fn sentinels(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// Waits until the master has sent everything to the replica.
    pub async fn sync_replica(&self) -> Result<()> {
        let acked = cli(self.master_port, &["WAIT", "1", "5000"]).await?;
        if acked != "1" {
            bail!("replica did not acknowledge: {acked}");
        }
        Ok(())
    }

    /// Kills the master (SIGKILL).
    pub async fn kill_master(&mut self) {
        if let Some(mut c) = self.master.take() {
            let _ = c.kill().await;
        }
    }

    /// The port the sentinels now call the master.
    pub async fn current_master(&self) -> Option<u16> {
        let out = cli(
            self.sentinel_ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER],
        )
        .await
        .ok()?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: TempDir,
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl TestPki {
    pub fn new() -> Result<Self> {
        let dir = TempDir::new("pki");
        let d = &dir.0;
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
            d,
        )?;
        std::fs::write(
            d.join("ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        for name in ["server", "client"] {
            openssl(
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    &format!("/CN={name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
                d,
            )?;
            openssl(
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-extfile",
                    "ext",
                    "-out",
                    &format!("{name}.pem"),
                ],
                d,
            )?;
        }
        Ok(Self {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            _dir: dir,
        })
    }
}

/// A Redis server that speaks TLS only, requiring client certificates from the test CA.
pub struct TlsRedis {
    pub port: u16,
    _dir: TempDir,
    _child: Child,
}

impl TlsRedis {
    pub async fn start(pki: &TestPki) -> Result<Self> {
        let dir = TempDir::new("redis-tls");
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .arg("--tls-cert-file")
            .arg(&pki.server_cert)
            .arg("--tls-key-file")
            .arg(&pki.server_key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args(["--tls-auth-clients", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server with TLS")?;
        wait_tcp(port, Duration::from_secs(10)).await?;
        Ok(Self {
            port,
            _dir: dir,
            _child: child,
        })
    }

    /// Runs one command over TLS with the client certificate.
    pub async fn cli(&self, pki: &TestPki, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["--tls", "-p", &self.port.to_string()])
            .arg("--cacert")
            .arg(&pki.ca)
            .arg("--cert")
            .arg(&pki.client_cert)
            .arg("--key")
            .arg(&pki.client_key)
            .args(args)
            .output()
            .await
            .context("redis-cli --tls")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}
