//! Issue 11: deployment files that are checked, not just written. The Kubernetes manifests in
//! `conf/k8s/` pass the Kubernetes schemas (`kubernetes-validate --strict`, schemas shipped in
//! the package, no cluster), `conf/docker-compose.yml` passes docker-compose's own `config`
//! check (no engine needed), each validator rejects a broken copy of the real file (so a pass
//! means something), and the promises their comments make hold: probes, grace periods against
//! the drain and grace of the configs they run, the admin port kept off the public Service, the
//! secrets taken from Secrets. Nothing here applies a manifest or starts a container.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;
use tests::{TempDir, tools_dir};

/// The Kubernetes minors the manifests are validated against: the oldest still commonly run
/// by managed clusters and the newest the pinned kubernetes-validate ships.
const K8S_VERSIONS: [&str; 2] = ["1.33", "1.37"];
/// An admin token for the compose file's required variable (never a real one).
const TOKEN: &str = "test-admin-token-0123456789abcdef";

fn conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A validator installed by `scripts/install-deps`; fails (never skips) when it is missing.
fn tool(relative: &str) -> PathBuf {
    let path = tools_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-deps",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Everything a command printed, for assertion messages.
fn printed(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn kubernetes_validate(file: &Path, version: &str) -> Output {
    run(Command::new(tool("venv/bin/kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .arg(file))
}

/// `docker-compose -f FILE config ARGS`, with `MCP_ADMIN_TOKEN` set only when `token` is.
fn compose_config(file: &Path, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(tool("compose/docker-compose"));
    cmd.env_remove("MCP_ADMIN_TOKEN")
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROFILES")
        .arg("-f")
        .arg(file)
        .arg("config")
        .args(args);
    if let Some(t) = token {
        cmd.env("MCP_ADMIN_TOKEN", t);
    }
    run(&mut cmd)
}

/// Every manifest file under `conf/k8s/`.
fn manifest_files() -> Vec<PathBuf> {
    let dir = conf().join("k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Every document of every manifest file.
fn manifests() -> Vec<Value> {
    let mut docs = Vec::new();
    for file in manifest_files() {
        for doc in serde_yaml::Deserializer::from_str(&read(&file)) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the manifests have no {kind} {name}"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

fn u64_of(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a whole number: {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

/// The port of a `host:port` address.
fn port_of(address: &str) -> u64 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{address} is not host:port"))
}

/// Whether `selector` (a `matchLabels` map) selects pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The only container of a workload's pod template.
fn container(pod: &Value) -> &Value {
    let containers = seq(&pod["containers"]);
    assert_eq!(containers.len(), 1, "one container per pod: {containers:?}");
    &containers[0]
}

/// A probe's or Service's port (a number or a container port name) as a number.
fn resolve_port(port: &Value, container: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port, "port");
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| u64_of(&p["containerPort"], "containerPort"))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// The ConfigMap key a container reads its `-c` file from, following the volume mount.
fn config_key<'a>(pod: &'a Value, container: &Value) -> (&'a str, &'a str) {
    let command: Vec<&str> = seq(&container["command"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let file = command
        .iter()
        .position(|a| *a == "-c")
        .and_then(|i| command.get(i + 1))
        .unwrap_or_else(|| panic!("no -c FILE in {command:?}"));
    let (dir, name) = file.rsplit_once('/').expect("an absolute path");
    let mount = seq(&container["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume = seq(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let item = seq(&volume["configMap"]["items"])
        .iter()
        .find(|i| i["path"] == name)
        .unwrap_or_else(|| panic!("{name} is not an item of the mounted ConfigMap"));
    (
        str_of(&volume["configMap"]["name"], "configMap.name"),
        str_of(&item["key"], "items[].key"),
    )
}

/// The Secret behind an environment variable, or a panic if it is anything else.
fn secret_env<'a>(container: &'a Value, name: &str) -> &'a Value {
    let var = seq(&container["env"])
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the container's environment"));
    assert!(
        var.get("value").is_none(),
        "{name} must not be a literal in the manifest"
    );
    let secret = &var["valueFrom"]["secretKeyRef"];
    assert!(
        secret["name"].as_str().is_some_and(|s| !s.is_empty())
            && secret["key"].as_str().is_some_and(|s| !s.is_empty()),
        "{name} must come from a Secret (valueFrom.secretKeyRef): {var:?}"
    );
    secret
}

/// Seconds of a Go duration as docker-compose renders it (`45s`, `1m30s`).
fn go_seconds(duration: &str) -> u64 {
    let (mut total, mut number) = (0, 0);
    for c in duration.chars() {
        match c {
            '0'..='9' => number = number * 10 + u64::from(c) - u64::from('0'),
            'h' | 'm' | 's' => {
                total += number
                    * match c {
                        'h' => 3600,
                        'm' => 60,
                        _ => 1,
                    };
                number = 0;
            }
            _ => panic!("unexpected duration {duration:?}"),
        }
    }
    total
}

#[test]
fn kubernetes_manifests_pass_the_schemas_and_a_broken_copy_does_not() {
    for file in manifest_files() {
        for version in K8S_VERSIONS {
            let out = kubernetes_validate(&file, version);
            assert!(
                out.status.success(),
                "{} does not validate against Kubernetes {version}: {}",
                file.display(),
                printed(&out)
            );
        }
    }
    // The validator is live: a misspelt field and a value of the wrong type, each in a copy
    // of the real manifest, are refused and named.
    let text = read(&conf().join("k8s/mcp-edge.yaml"));
    let dir = TempDir::new("k8s-broken");
    for (from, to, named) in [
        (
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:",
            "'terminationGracePeriodSecond' was unexpected",
        ),
        ("minReplicas: 3", "minReplicas: three", "'three'"),
    ] {
        assert!(text.contains(from), "the manifest has {from:?}");
        let path = dir.0.join("broken.yaml");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
        let out = kubernetes_validate(&path, K8S_VERSIONS[1]);
        assert!(
            !out.status.success() && printed(&out).contains(named),
            "kubernetes-validate must refuse {to:?} naming it: {}",
            printed(&out)
        );
    }
}

#[test]
fn compose_file_passes_docker_compose_config_and_a_broken_copy_does_not() {
    let file = conf().join("docker-compose.yml");
    let out = compose_config(&file, Some(TOKEN), &["--quiet"]);
    assert!(
        out.status.success(),
        "docker-compose config refuses {}: {}",
        file.display(),
        printed(&out)
    );
    // Without an admin token compose refuses to start the stack at all.
    let out = compose_config(&file, None, &["--quiet"]);
    assert!(
        !out.status.success() && printed(&out).contains("MCP_ADMIN_TOKEN"),
        "compose must require MCP_ADMIN_TOKEN: {}",
        printed(&out)
    );
    // The check is live: an unknown key and a bad duration in copies are refused and named.
    let text = read(&file);
    let dir = TempDir::new("compose-broken");
    for (from, to, named) in [
        (
            "stop_grace_period: 45s",
            "stop_grace_periods: 45s",
            "'stop_grace_periods' not allowed",
        ),
        ("interval: 5s", "interval: fives", "\"fives\""),
    ] {
        assert!(text.contains(from), "the compose file has {from:?}");
        let path = dir.0.join("docker-compose.yml");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
        let out = compose_config(&path, Some(TOKEN), &["--quiet"]);
        assert!(
            !out.status.success() && printed(&out).contains(named),
            "docker-compose config must refuse {to:?} naming it: {}",
            printed(&out)
        );
    }

    // The promises of its comments, on the model compose itself renders (anchors merged).
    let out = compose_config(&file, Some(TOKEN), &["--format", "json"]);
    assert!(out.status.success(), "{}", printed(&out));
    let model: serde_json::Value = serde_json::from_slice(&out.stdout).expect("compose JSON");
    let services = &model["services"];
    let backend = backend::config::FileConfig::parse(&read(&conf().join("backend.yaml")))
        .expect("conf/backend.yaml")
        .validate()
        .expect("conf/backend.yaml validates");
    let backend_leave = (backend.shutdown_drain + backend.shutdown_grace).as_secs();
    let proxy: Value =
        serde_yaml::from_str(&read(&conf().join("proxy.docker.yaml"))).expect("YAML");
    let proxy_leave = proxy["server"]["grace_period_seconds"]
        .as_u64()
        .unwrap_or(30)
        + proxy["server"]["graceful_shutdown_timeout_seconds"]
            .as_u64()
            .unwrap_or(5);
    let admin_port = port_of(str_of(&proxy["admin"]["address"], "admin.address"));
    for name in ["backend-1", "backend-2", "backend-3", "proxy"] {
        let s = &services[name];
        let stop = go_seconds(s["stop_grace_period"].as_str().unwrap_or("10s"));
        let (leave, what) = if name == "proxy" {
            (
                proxy_leave,
                "grace_period_seconds + graceful_shutdown_timeout_seconds",
            )
        } else {
            assert!(
                s["command"]
                    .to_string()
                    .contains("/etc/mcp-edge/backend.yaml"),
                "{name} runs conf/backend.yaml: {}",
                s["command"]
            );
            (
                backend_leave,
                "shutdown_drain_seconds + shutdown_grace_seconds",
            )
        };
        assert!(
            stop > leave,
            "{name}: stop_grace_period {stop} s must exceed {what} ({leave} s)"
        );
        assert_eq!(s["read_only"], true, "{name}: read-only root filesystem");
        assert_eq!(
            s["cap_drop"],
            serde_json::json!(["ALL"]),
            "{name}: cap_drop"
        );
    }
    let published: Vec<&serde_json::Value> = services["proxy"]["ports"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["target"] == admin_port).collect())
        .unwrap_or_default();
    assert!(!published.is_empty(), "the admin port is published");
    for p in published {
        assert_eq!(
            p["host_ip"], "127.0.0.1",
            "the admin port {admin_port} is published on the host's loopback only: {p}"
        );
    }
}

#[test]
fn kubernetes_manifests_keep_their_promises() {
    let docs = manifests();
    let kind_of = |d: &Value| d["kind"].as_str().unwrap_or_default().to_owned();

    // The namespace enforces the restricted pod security profile, and every container meets it
    // and has requests and limits.
    let ns = find(&docs, "Namespace", "mcp-edge");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted",
        "the namespace enforces the restricted profile"
    );
    for d in docs
        .iter()
        .filter(|d| ["Deployment", "StatefulSet"].contains(&kind_of(d).as_str()))
    {
        let name = str_of(&d["metadata"]["name"], "name");
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{name}: no API token"
        );
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{name}: runAsNonRoot"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}: seccomp"
        );
        for c in seq(&pod["containers"]) {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}: read-only root");
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{name}: no escalation"
            );
            assert!(
                seq(&sc["capabilities"]["drop"]).iter().any(|c| c == "ALL"),
                "{name}: drops ALL capabilities"
            );
            for (part, resource) in [
                ("requests", "cpu"),
                ("requests", "memory"),
                ("limits", "memory"),
            ] {
                assert!(
                    !c["resources"][part][resource].is_null(),
                    "{name}: resources.{part}.{resource}"
                );
            }
            assert!(!c["readinessProbe"].is_null(), "{name}: readiness probe");
            assert!(!c["livenessProbe"].is_null(), "{name}: liveness probe");
        }
    }

    // The backends: ready only when /health says so (503 while draining), and given longer
    // than their own drain + grace to leave, read from the config they run.
    let deployment = find(&docs, "Deployment", "mcp-backend");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let c = container(pod);
    let (map, key) = config_key(pod, c);
    let backend_yaml = str_of(&find(&docs, "ConfigMap", map)["data"][key], "backend.yaml");
    let backend = backend::config::FileConfig::parse(backend_yaml)
        .unwrap_or_else(|e| panic!("ConfigMap {map} {key}: {e}"))
        .validate()
        .unwrap_or_else(|e| panic!("ConfigMap {map} {key}: {e}"));
    let backend_port = u64::from(backend.listen.port());
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/health", "backend readiness on /health");
    assert_eq!(resolve_port(&probe["port"], c), backend_port, "probe port");
    assert!(
        c["livenessProbe"]["httpGet"].is_null(),
        "backend liveness must not be /health (503 when Redis is away or while draining)"
    );
    let leave = (backend.shutdown_drain + backend.shutdown_grace).as_secs();
    let grace = u64_of(
        &pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    assert!(
        grace > leave,
        "backend terminationGracePeriodSeconds {grace} must exceed shutdown_drain_seconds + shutdown_grace_seconds ({leave})"
    );
    secret_env(c, "REDIS_PASSWORD");
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the autoscaler owns the backend count: no spec.replicas"
    );

    // The headless Service the proxy discovers them by: ready pods only.
    let headless = docs
        .iter()
        .find(|d| d["kind"] == "Service" && selects(&d["spec"]["selector"], labels))
        .expect("a Service selects the backends");
    let svc = str_of(&headless["metadata"]["name"], "name");
    assert_eq!(headless["spec"]["clusterIP"], "None", "{svc} is headless");
    assert_ne!(
        headless["spec"]["publishNotReadyAddresses"], true,
        "{svc} must publish ready pods only"
    );
    let svc_port = seq(&headless["spec"]["ports"]).first().expect("a port");
    assert_eq!(
        resolve_port(svc_port.get("targetPort").unwrap_or(&svc_port["port"]), c),
        backend_port,
        "{svc} targets the backend port"
    );

    // The autoscaler and the disruption budget work on those pods.
    let hpa = docs
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .expect("an autoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2", "HPA version");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["kind"], "Deployment",
        "HPA target"
    );
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"], "mcp-backend",
        "HPA target"
    );
    let min = u64_of(&hpa["spec"]["minReplicas"], "minReplicas");
    assert!(min >= 2, "at least two backends at all times (got {min})");
    assert!(
        u64_of(&hpa["spec"]["maxReplicas"], "maxReplicas") >= min,
        "max >= min"
    );
    assert!(
        !c["resources"]["requests"]["cpu"].is_null(),
        "CPU utilization needs a CPU request"
    );
    assert!(
        docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"
            && d["apiVersion"] == "policy/v1"
            && selects(&d["spec"]["selector"]["matchLabels"], labels)),
        "a policy/v1 PodDisruptionBudget covers the backends"
    );

    // The proxy finds them through that Service, by DNS.
    let proxy_deployment = find(&docs, "Deployment", "mcp-proxy");
    let proxy_pod = &proxy_deployment["spec"]["template"]["spec"];
    let proxy_labels = &proxy_deployment["spec"]["template"]["metadata"]["labels"];
    let pc = container(proxy_pod);
    let (map, key) = config_key(proxy_pod, pc);
    let proxy: Value = serde_yaml::from_str(str_of(
        &find(&docs, "ConfigMap", map)["data"][key],
        "proxy.yaml",
    ))
    .expect("proxy.yaml is YAML");
    let expected = format!(
        "{svc}.{}.svc.cluster.local:{}",
        str_of(&headless["metadata"]["namespace"], "namespace"),
        u64_of(&svc_port["port"], "port")
    );
    for pool in seq(&proxy["pools"]) {
        for b in seq(&pool["backends"]) {
            assert_eq!(
                b["discover"].as_str(),
                Some(expected.as_str()),
                "the proxy discovers the backends through the headless Service: {b:?}"
            );
        }
    }

    // Its admin listener is private: a token from a Secret, its port in no public Service,
    // and only the monitoring namespace let in by the NetworkPolicy.
    let token = str_of(&proxy["admin"]["token"], "admin.token");
    let var = token
        .strip_prefix("env:")
        .unwrap_or_else(|| panic!("admin.token must be env:NAME, not {token:?}"));
    secret_env(pc, var);
    let admin_port = port_of(str_of(&proxy["admin"]["address"], "admin.address"));
    let mut public = 0;
    for s in docs.iter().filter(|d| {
        d["kind"] == "Service"
            && ["LoadBalancer", "NodePort"].contains(&d["spec"]["type"].as_str().unwrap_or(""))
    }) {
        public += 1;
        let name = str_of(&s["metadata"]["name"], "name");
        for p in seq(&s["spec"]["ports"]) {
            let target = resolve_port(p.get("targetPort").unwrap_or(&p["port"]), pc);
            assert_ne!(
                target, admin_port,
                "public Service {name} exposes the admin port: {p:?}"
            );
        }
    }
    assert!(public > 0, "a public Service for the MCP listener");
    let policy = docs
        .iter()
        .find(|d| {
            d["kind"] == "NetworkPolicy"
                && selects(&d["spec"]["podSelector"]["matchLabels"], proxy_labels)
        })
        .expect("a NetworkPolicy for the proxy");
    for rule in seq(&policy["spec"]["ingress"]) {
        let ports = seq(&rule["ports"]);
        if ports.is_empty()
            || ports
                .iter()
                .any(|p| resolve_port(&p["port"], pc) == admin_port)
        {
            assert!(
                !seq(&rule["from"]).is_empty(),
                "the admin port is open to everyone: {rule:?}"
            );
        }
    }

    // The proxy leaves within its terminationGracePeriodSeconds: preStop, then its grace.
    let pre_stop: u64 = seq(&pc["lifecycle"]["preStop"]["exec"]["command"])
        .iter()
        .filter_map(|a| a.as_str()?.parse::<u64>().ok())
        .sum();
    let proxy_leave = pre_stop
        + proxy["server"]["grace_period_seconds"]
            .as_u64()
            .unwrap_or(30)
        + proxy["server"]["graceful_shutdown_timeout_seconds"]
            .as_u64()
            .unwrap_or(5);
    let grace = u64_of(
        &proxy_pod["terminationGracePeriodSeconds"],
        "terminationGracePeriodSeconds",
    );
    assert!(
        grace > proxy_leave,
        "proxy terminationGracePeriodSeconds {grace} must exceed preStop + grace ({proxy_leave})"
    );

    // Redis keeps its data: append-only file on a claimed volume, mounted where it writes.
    let redis = find(&docs, "StatefulSet", "redis");
    let rc = container(&redis["spec"]["template"]["spec"]);
    let command = seq(&rc["command"])
        .iter()
        .chain(seq(&rc["args"]))
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        command.contains("--appendonly yes") && command.contains("--dir /data"),
        "Redis persists to /data: {command}"
    );
    let claim = &seq(&redis["spec"]["volumeClaimTemplates"])
        .first()
        .expect("a volume claim")["metadata"]["name"];
    assert!(
        seq(&rc["volumeMounts"])
            .iter()
            .any(|m| m["name"] == *claim && m["mountPath"] == "/data"),
        "the claimed volume is mounted at /data"
    );
    secret_env(rc, "REDIS_PASSWORD");
}
