//! `ferry operator` against a real kube-apiserver (with etcd), built and
//! started by `scripts/kube-apiserver.sh` inside the manager's test host,
//! driven with `kubectl` as a user would. The control plane is the one of
//! `tests/control.rs`: a registry on `r`, a manager on `m`, workers on `n1`
//! and `n2`, a Redis client on `client`.
//!
//! - The sample Instance: applied → Running on node-1 with an address; a
//!   Redis writer writes through its exposed port while `kubectl patch`
//!   moves it to node-2 (Migrating, then Ready, a new address) and back
//!   with the operator SIGKILLed in the middle of the move and a new
//!   replica taking the Lease over; an edit while a move runs is acted on
//!   after it; an unknown node is reported and nothing moves; no
//!   acknowledged write is lost; `kubectl delete` removes the VM, then the
//!   object.
//! - Bad input refused by the API server's schema (no `packageRaddr`, a
//!   malformed one); an Instance on an unknown node: a condition says so,
//!   nothing is created.
//! - RBAC: the operator works with exactly the permissions of
//!   `deploy/rbac.yaml`; a second replica waits for the Lease.
//! - The operator SIGKILLed right after a create reached the manager, and
//!   while its finalizer waits for a move to end (a delete while moving);
//!   two Instances on the same source; the manager killed: Degraded with
//!   the reason, and the step taken once it is back.
//!
//! The tests skip (saying so) only when Go is missing, so that
//! kube-apiserver cannot be built; they never fake the API server.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_test_support::{
    describe, qemu_pids, vm_lock, wait_until, workspace_root, FerryEnv, Host, KillOnDrop, TestHosts,
};
use serde_json::Value;

mod common;
use common::hosts::{registry, start};
use common::kv::{in_netns, missing, writer, Writes};
use common::{env, recipe_package};

const REGISTRY_PORT: u16 = 7070;
const LINK_PORT: u16 = 1399;
const REDIS_PORT: u16 = 16379;
const METRICS: &str = "127.0.0.1:9464";

fn script() -> PathBuf {
    workspace_root().join("scripts/kube-apiserver.sh")
}

/// Builds (or finds cached) kube-apiserver, kubectl and etcd; false, with
/// a message, when Go is missing.
fn kube_available() -> bool {
    let out = Command::new("bash")
        .arg(script())
        .arg("build")
        .output()
        .expect("bash");
    match out.status.code() {
        Some(0) => true,
        Some(4) => {
            eprintln!(
                "SKIPPED: Go is missing, so kube-apiserver cannot be built for the operator tests: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        _ => panic!("scripts/kube-apiserver.sh build: {}", describe(&out)),
    }
}

/// A kube-apiserver and etcd on the loopback of a test host.
struct Kube {
    dir: tempfile::TempDir,
    netns: String,
}

impl Kube {
    fn start(host: &Host, rbac: bool) -> Kube {
        let dir = tempfile::Builder::new()
            .prefix("ferry-kube-")
            .tempdir()
            .unwrap();
        let mut c = host.cmd("bash");
        c.arg(script()).arg("start").arg(dir.path());
        if rbac {
            c.arg("--rbac");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        Kube {
            dir,
            netns: host.name().to_string(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, kubeconfig: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns])
            .arg(self.path("kubectl"))
            .arg("--kubeconfig")
            .arg(self.path(kubeconfig));
        c
    }

    /// `kubectl ARGS` as the admin.
    fn kubectl(&self, args: &[&str]) -> Output {
        self.command("kubeconfig").args(args).output().unwrap()
    }

    /// `kubectl ARGS` that must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `kubectl apply -f -` of `yaml`.
    fn apply(&self, yaml: &str) -> Output {
        let mut c = self.command("kubeconfig");
        c.args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Instance `name` as JSON (Null once it is gone).
    fn instance(&self, name: &str) -> Value {
        let out = self.kubectl(&["get", "instance", name, "-o", "json"]);
        if !out.status.success() {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("NotFound"),
                "{}",
                describe(&out)
            );
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn install_crd(&self) {
        let crd = workspace_root().join("deploy/crd.yaml");
        self.ok(&["apply", "-f", crd.to_str().unwrap()]);
        self.ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/instances.ferry.dev",
        ]);
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

fn condition(inst: &Value, type_: &str) -> Value {
    inst["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

struct Cluster {
    _registry: KillOnDrop,
    manager: KillOnDrop,
    _workers: Vec<KillOnDrop>,
    registry: String,
}

/// A registry on `r` serving the Redis package, a manager on `m`, and a
/// worker `node-N` on each of `nodes`.
fn cluster(hosts: &TestHosts, envs: &mut Vec<FerryEnv>, nodes: &[&str]) -> Cluster {
    let bin = env!("CARGO_BIN_EXE_ferry");
    let pkg = recipe_package(&env(), "redis");
    let (r, m) = (&hosts["r"], &hosts["m"]);
    let er = r.ferry_env(bin);
    let em = m.ferry_env(bin);
    let registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let link = format!("{}:{LINK_PORT}", m.addr());
    let manager = manager(m, &em);
    let mut workers = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let e = hosts[*n].ferry_env(bin);
        workers.push(start(
            &hosts[*n],
            &e,
            &[
                "worker",
                "--name",
                &format!("node-{}", i + 1),
                "--host-interface",
                hosts[*n].interface(),
                "--control-plane",
                &link,
                "--lease-s",
                "3",
                "--insecure",
            ],
            "registered as node ",
        ));
        envs.push(e);
    }
    envs.push(er);
    envs.push(em);
    Cluster {
        _registry: registry,
        manager,
        _workers: workers,
        registry: format!("{}:{REGISTRY_PORT}", r.addr()),
    }
}

/// `ferry manager` on `m`, its store in `em`'s state (so a restart finds
/// its records).
fn manager(m: &Host, em: &FerryEnv) -> KillOnDrop {
    let link = format!("{}:{LINK_PORT}", m.addr());
    let store = em.state.path().join("manager-store");
    start(
        m,
        em,
        &[
            "manager",
            "--workers-listen",
            &link,
            "--insecure",
            "--store",
            store.to_str().unwrap(),
            "--op-timeout-s",
            "300",
        ],
        "listening on ",
    )
}

/// `ferry operator run` inside `m` (where the manager's API is on
/// loopback), until it prints `until` (`ready` once it acts); its log goes
/// to the kube directory.
fn operator(
    m: &Host,
    em: &FerryEnv,
    kube: &Kube,
    kubeconfig: &str,
    identity: &str,
    extra: &[&str],
    until: &str,
) -> KillOnDrop {
    let mut c = m.ferry(em);
    c.args(["operator", "run", "--kubeconfig"])
        .arg(kube.path(kubeconfig))
        .args([
            "--manager",
            "http://127.0.0.1:1400",
            "--leader-elect",
            "--lease-duration-s",
            "6",
            "--identity",
            identity,
        ])
        .args(extra)
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(kube.path(&format!("operator-{identity}.log")))
                .unwrap(),
        );
    let mut child = c.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = line.starts_with(until);
                lines.push(line);
                if done {
                    // Keep draining its output.
                    std::thread::spawn(move || while rx.recv().is_ok() {});
                    return KillOnDrop::new(child);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => {
                let _ = child.wait();
                let log = std::fs::read_to_string(kube.path(&format!("operator-{identity}.log")))
                    .unwrap_or_default();
                panic!("the operator exited before '{until}': {lines:?} {log}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "the operator did not print '{until}' within 60 s: {lines:?}"
        );
    }
}

/// The sample Instance of `deploy/`, its registry set to `registry`.
fn sample(registry: &str) -> String {
    let yaml =
        std::fs::read_to_string(workspace_root().join("deploy/sample-instance.yaml")).unwrap();
    assert!(yaml.contains("packageRaddr: \"10.0.0.1:7070\""), "{yaml}");
    yaml.replace("10.0.0.1:7070", registry)
}

/// The VMs `ferry ps` shows running on a host.
fn running_on(n: &Host, env: &FerryEnv) -> Vec<String> {
    let out = n.ferry(env).args(["ps", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "running")
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// The manager's record of VM `name` (Null when it has none).
fn vm_record(m: &Host, name: &str) -> Value {
    let out = m
        .cmd("curl")
        .args(["-sS", &format!("http://127.0.0.1:1400/v1/instances/{name}")])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if v["status"] == 404 {
        Value::Null
    } else {
        v
    }
}

/// Polls Instance `name` until `done` holds; returns every state seen on
/// the way and the last object.
fn watch_until(
    kube: &Kube,
    name: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Vec<String>, Value) {
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let inst = kube.instance(name);
        let state = inst["status"]["state"].as_str().unwrap_or("").to_string();
        let migrating = condition(&inst, "Migrating")["status"] == "True";
        let label = if migrating {
            format!("{state}+Migrating")
        } else {
            state
        };
        if seen.last() != Some(&label) {
            seen.push(label);
        }
        if done(&inst) {
            return (seen, inst);
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}: saw {seen:?}, now {inst}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn running_on_node(inst: &Value, node: &str) -> bool {
    inst["status"]["state"] == "Running"
        && inst["status"]["nodeName"] == node
        && condition(inst, "Ready")["status"] == "True"
        && condition(inst, "Migrating")["status"] != "True"
}

fn patch_node(kube: &Kube, name: &str, node: &str) {
    let patch = format!(r#"{{"spec":{{"nodeName":"{node}"}}}}"#);
    kube.ok(&["patch", "instance", name, "--type", "merge", "-p", &patch]);
}

fn events(kube: &Kube, name: &str) -> Vec<String> {
    let out = kube.ok(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ]);
    out.lines().map(str::to_string).collect()
}

#[test]
fn kubectl_creates_moves_and_deletes_a_vm_through_the_operator() {
    // Built before the VM lock: a first build takes minutes, and the
    // test's time limit runs from the lock.
    if !kube_available() {
        return;
    }
    let _lock = vm_lock();
    let hosts = TestHosts::create(&["r", "m", "n1", "n2", "client"]);
    let (m, n1, n2) = (&hosts["m"], &hosts["n1"], &hosts["n2"]);
    let mut envs = Vec::new();
    let cl = cluster(&hosts, &mut envs, &["n1", "n2"]);
    let (e1, e2, em) = (&envs[0], &envs[1], &envs[3]);
    let started = Instant::now();
    let kube = Kube::start(m, false);
    eprintln!("kube-apiserver ready in {:?}", started.elapsed());
    kube.install_crd();

    // Bad input never reaches the operator: the schema refuses it.
    let out = kube.apply(
        "apiVersion: ferry.dev/v1alpha1\nkind: Instance\nmetadata: {name: bad}\nspec: {nodeName: node-1}\n",
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.packageRaddr: Required value"), "{err}");
    let out = kube.apply(
        "apiVersion: ferry.dev/v1alpha1\nkind: Instance\nmetadata: {name: bad}\nspec: {nodeName: node-1, packageRaddr: 'not an address'}\n",
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.packageRaddr") && err.contains("should match"),
        "{err}"
    );

    let extra = ["--metrics-listen", METRICS, "--lease-namespace", "default"];
    let mut op = operator(m, em, &kube, "kubeconfig", "op-a", &extra, "ready");

    // The sample: Running on node-1 with an address.
    let out = kube.apply(&sample(&cl.registry));
    assert!(out.status.success(), "{}", describe(&out));
    let (seen, kv) = watch_until(
        &kube,
        "kv",
        "kv to run on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    eprintln!("create: {seen:?}");
    let addr1 = kv["status"]["packageLaddr"].as_str().unwrap().to_string();
    assert!(addr1.starts_with(&n1.addr().to_string()), "{kv}");
    assert_eq!(
        kv["status"]["observedGeneration"],
        kv["metadata"]["generation"]
    );
    assert_eq!(kv["metadata"]["finalizers"][0], "ferry.dev/vm", "{kv}");
    assert_eq!(
        kv["status"]["exposes"][0],
        format!("{}:{REDIS_PORT}:6379", n1.addr())
    );
    assert_eq!(running_on(n1, e1), ["default.kv"]);
    let table = kube.ok(&["get", "instances"]);
    assert!(
        table.contains("NODE") && table.contains("STATE") && table.contains("ADDRESS"),
        "{table}"
    );
    assert!(
        table.contains("node-1") && table.contains(&addr1),
        "{table}"
    );

    // A Redis client writes through the exposed port, wherever it is.
    let targets: Vec<SocketAddr> = [n1, n2]
        .iter()
        .map(|n| SocketAddr::new(n.addr().into(), REDIS_PORT))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Writes::default()));
    let w = {
        let (t, s, o) = (targets.clone(), stop.clone(), writes.clone());
        in_netns(hosts["client"].name(), move || writer(t, s, o))
    };
    let acked = || writes.lock().unwrap().acked.len();
    wait_until(Duration::from_secs(60), "the first writes", || {
        (acked() > 50).then_some(())
    });

    // → node-2: Migrating, then Ready there at a new address.
    patch_node(&kube, "kv", "node-2");
    let (seen, kv) = watch_until(
        &kube,
        "kv",
        "kv to move to node-2",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-2"),
    );
    eprintln!("move to node-2: {seen:?}");
    assert!(
        seen.iter().any(|s| s.ends_with("+Migrating")),
        "a Migrating condition was shown: {seen:?}"
    );
    let addr2 = kv["status"]["packageLaddr"].as_str().unwrap().to_string();
    assert!(addr2.starts_with(&n2.addr().to_string()), "{kv}");
    assert_eq!(condition(&kv, "Migrating")["reason"], "Moved", "{kv}");
    let moves = kv["status"]["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 1, "{kv}");
    assert_eq!(moves[0]["phase"], "Succeeded");
    assert!(
        moves[0]["endTime"].is_string() && moves[0]["downtimeMs"].is_u64(),
        "{kv}"
    );
    let before = acked();
    wait_until(Duration::from_secs(60), "writes on node-2", || {
        (acked() > before + 50).then_some(())
    });

    // → node-1, with the operator SIGKILLed in the middle of the move; a
    // new replica takes the Lease over once it expires and finds the move
    // in the manager's record.
    patch_node(&kube, "kv", "node-1");
    watch_until(
        &kube,
        "kv",
        "the move to start",
        Duration::from_secs(30),
        |i| condition(i, "Migrating")["status"] == "True",
    );
    op.kill().unwrap();
    let _ = op.wait();
    drop(op);
    let op = operator(m, em, &kube, "kubeconfig", "op-b", &extra, "ready");
    let (seen, kv) = watch_until(
        &kube,
        "kv",
        "kv to be back on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    eprintln!("move to node-1 across an operator restart: {seen:?}");
    let addr3 = kv["status"]["packageLaddr"].as_str().unwrap().to_string();
    assert!(addr3.starts_with(&n1.addr().to_string()), "{kv}");
    assert_ne!(addr3, addr2, "the address follows the VM");
    wait_until(
        Duration::from_secs(30),
        "the VM to run in one place",
        || (running_on(n1, e1) == ["default.kv"] && running_on(n2, e2).is_empty()).then_some(()),
    );
    let lease = kube.ok(&[
        "get",
        "lease",
        "ferry-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(lease, "op-b");

    // An edit while a move runs: the second move starts after the first
    // ends, never at the same time.
    patch_node(&kube, "kv", "node-2");
    watch_until(
        &kube,
        "kv",
        "the move to start",
        Duration::from_secs(30),
        |i| condition(i, "Migrating")["status"] == "True",
    );
    patch_node(&kube, "kv", "node-1");
    // (A move back to the node it just left may be refused while the
    // source still tears its copy down; the operator retries it.)
    let succeeded = |i: &Value| -> Vec<Value> {
        i["status"]["moves"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["phase"] == "Succeeded")
            .cloned()
            .collect()
    };
    let (seen, kv) = watch_until(
        &kube,
        "kv",
        "kv to end on node-1",
        Duration::from_secs(240),
        |i| running_on_node(i, "node-1") && succeeded(i).len() == 4,
    );
    eprintln!("an edit while moving: {seen:?}");
    let ok = succeeded(&kv);
    assert_eq!(
        (ok[2]["to"].as_str(), ok[3]["to"].as_str()),
        (Some("node-2"), Some("node-1")),
        "{kv}"
    );
    let moves = kv["status"]["moves"].as_array().unwrap();
    for pair in moves.windows(2) {
        assert!(
            time_key(&pair[1]["startTime"]) >= time_key(&pair[0]["endTime"]),
            "one move at a time: {kv}"
        );
    }

    // An unknown node: the condition says so, and nothing moves.
    patch_node(&kube, "kv", "node-9");
    let (_, kv) = watch_until(
        &kube,
        "kv",
        "an UnknownNode condition",
        Duration::from_secs(30),
        |i| condition(i, "Degraded")["reason"] == "UnknownNode",
    );
    assert!(
        condition(&kv, "Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("no worker is named 'node-9'"),
        "{kv}"
    );
    assert_eq!(kv["status"]["nodeName"], "node-1");
    assert_eq!(kv["status"]["state"], "Running");
    patch_node(&kube, "kv", "node-1");
    watch_until(
        &kube,
        "kv",
        "Degraded to clear",
        Duration::from_secs(60),
        |i| condition(i, "Degraded")["status"] == "False",
    );

    // A new Instance on an unknown node: Pending, said why, nothing created.
    let ghost = sample(&cl.registry)
        .replace("name: kv", "name: ghost")
        .replace("nodeName: node-1", "nodeName: node-9")
        .replace("16379:6379", "16380:6379");
    let out = kube.apply(&ghost);
    assert!(out.status.success(), "{}", describe(&out));
    let (_, g) = watch_until(
        &kube,
        "ghost",
        "ghost to be Pending",
        Duration::from_secs(30),
        |i| condition(i, "Ready")["reason"] == "UnknownNode",
    );
    assert_eq!(g["status"]["state"], "Pending", "{g}");
    assert_eq!(vm_record(m, "default.ghost"), Value::Null);
    kube.ok(&["delete", "instance", "ghost", "--timeout=60s"]);

    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let writes = writes.lock().unwrap();
    assert!(writes.acked.len() > 200, "{} writes", writes.acked.len());
    let gone = in_netns(hosts["client"].name(), {
        let (addr, acked) = (targets[0], writes.acked.clone());
        move || missing(addr, &acked)
    })
    .join()
    .unwrap();
    assert!(
        gone.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        gone.len(),
        writes.acked.len(),
        &gone[..gone.len().min(10)]
    );

    // Events on each step, metrics of the reconciles.
    let evs = events(&kube, "kv");
    for reason in [
        "Creating",
        "Created",
        "Migrating",
        "Migrated",
        "UnknownNode",
    ] {
        assert!(evs.iter().any(|e| e == reason), "{reason} in {evs:?}");
    }
    let out = m
        .cmd("curl")
        .args(["-sS", &format!("http://{METRICS}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(metrics.contains("ferry_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains("ferry_operator_steps_total{step=\"move\",result=\"ok\"}"),
        "{metrics}"
    );

    // kubectl delete: the VM goes, then the object.
    kube.ok(&["delete", "instance", "kv", "--timeout=120s"]);
    assert_eq!(kube.instance("kv"), Value::Null);
    assert_eq!(vm_record(m, "default.kv"), Value::Null);
    assert!(running_on(n1, e1).is_empty());
    assert!(qemu_pids("default.kv").is_empty(), "no QEMU left");
    drop(op);
    for (n, e) in [(n1, e1), (n2, e2)] {
        let _ = n.ferry(e).args(["stop", "--all", "--discard"]).output();
    }
}

#[test]
fn the_operator_works_with_exactly_the_permissions_in_deploy() {
    // Built before the VM lock: a first build takes minutes, and the
    // test's time limit runs from the lock.
    if !kube_available() {
        return;
    }
    let _lock = vm_lock();
    let hosts = TestHosts::create(&["r", "m", "n1"]);
    let (m, n1) = (&hosts["m"], &hosts["n1"]);
    let mut envs = Vec::new();
    let cl = cluster(&hosts, &mut envs, &["n1"]);
    let (e1, em) = (&envs[0], &envs[2]);
    let kube = Kube::start(m, true);
    kube.install_crd();
    let rbac = workspace_root().join("deploy/rbac.yaml");
    kube.ok(&["apply", "-f", rbac.to_str().unwrap()]);

    // The operator's identity can do what deploy/ grants, and no more.
    let can = |args: &[&str]| {
        let out = kube
            .command("operator.kubeconfig")
            .args(["auth", "can-i"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(can(&["watch", "instances.ferry.dev", "-A"]), "yes");
    assert_eq!(
        can(&["patch", "instances.ferry.dev", "--subresource=status"]),
        "yes"
    );
    assert_eq!(can(&["delete", "instances.ferry.dev"]), "no");
    assert_eq!(can(&["create", "leases", "-n", "ferry-system"]), "yes");
    assert_eq!(can(&["create", "leases", "-n", "default"]), "no");
    assert_eq!(can(&["get", "secrets"]), "no");

    let extra = ["--lease-namespace", "ferry-system"];
    let op = operator(m, em, &kube, "operator.kubeconfig", "op-a", &extra, "ready");
    // A second replica waits for the Lease and does not act.
    let second = operator(
        m,
        em,
        &kube,
        "operator.kubeconfig",
        "op-b",
        &extra,
        "waiting for the lease held by op-a",
    );

    let out = kube.apply(&sample(&cl.registry));
    assert!(out.status.success(), "{}", describe(&out));
    let (_, kv) = watch_until(
        &kube,
        "kv",
        "kv to run on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    assert!(kv["status"]["packageLaddr"]
        .as_str()
        .unwrap()
        .starts_with(&n1.addr().to_string()));
    assert_eq!(running_on(n1, e1), ["default.kv"]);
    let evs = events(&kube, "kv");
    assert!(evs.iter().any(|e| e == "Created"), "{evs:?}");
    let log = std::fs::read_to_string(kube.path("operator-op-a.log")).unwrap();
    assert!(!log.contains("forbidden"), "{log}");
    let log_b = std::fs::read_to_string(kube.path("operator-op-b.log")).unwrap_or_default();
    assert!(
        !log_b.contains("reconcil"),
        "the waiting replica acted: {log_b}"
    );

    // The leader stopped cleanly (SIGTERM) hands the Lease on at once,
    // well before it would expire (6 s), and the other replica acts: it
    // deletes the VM, with the same permissions.
    let mut op = op;
    ferry_test_support::send_signal(op.id(), libc::SIGTERM);
    let status = wait_until(Duration::from_secs(30), "the leader to exit", || {
        op.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
    let exited = Instant::now();
    wait_until(Duration::from_secs(10), "op-b to take the lease", || {
        let holder = kube.ok(&[
            "get",
            "lease",
            "-n",
            "ferry-system",
            "ferry-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        (holder == "op-b").then_some(())
    });
    assert!(
        exited.elapsed() < Duration::from_secs(5),
        "taken over in {:?}, not after the lease expired",
        exited.elapsed()
    );

    kube.ok(&["delete", "instance", "kv", "--timeout=120s"]);
    assert_eq!(kube.instance("kv"), Value::Null);
    assert!(running_on(n1, e1).is_empty());
    assert!(qemu_pids("default.kv").is_empty(), "no QEMU left");
    let log_b = std::fs::read_to_string(kube.path("operator-op-b.log")).unwrap_or_default();
    assert!(!log_b.contains("forbidden"), "{log_b}");
    drop(second);
    drop(op);
    let _ = n1.ferry(e1).args(["stop", "--all", "--discard"]).output();
}

#[test]
fn the_operator_killed_at_each_step_leaves_nothing_behind() {
    // Built before the VM lock: a first build takes minutes, and the
    // test's time limit runs from the lock.
    if !kube_available() {
        return;
    }
    let _lock = vm_lock();
    let hosts = TestHosts::create(&["r", "m", "n1", "n2"]);
    let (m, n1, n2) = (&hosts["m"], &hosts["n1"], &hosts["n2"]);
    let mut envs = Vec::new();
    let cl = cluster(&hosts, &mut envs, &["n1", "n2"]);
    let (e1, e2, em) = (&envs[0], &envs[1], &envs[3]);
    let kube = Kube::start(m, false);
    kube.install_crd();
    let extra = ["--lease-namespace", "default"];
    let mut op = operator(m, em, &kube, "kubeconfig", "op-a", &extra, "ready");

    // SIGKILLed right after the create was sent to the manager: the
    // restarted operator finds the create in the manager's record.
    let out = kube.apply(&sample(&cl.registry));
    assert!(out.status.success(), "{}", describe(&out));
    let rec = wait_until(Duration::from_secs(60), "the create to be sent", || {
        let r = vm_record(m, "default.kv");
        (!r.is_null()).then_some(r)
    });
    op.kill().unwrap();
    let _ = op.wait();
    drop(op);
    eprintln!("killed with the VM {}", rec["state"]);
    let mut op = operator(m, em, &kube, "kubeconfig", "op-a", &extra, "ready");
    let (seen, _) = watch_until(
        &kube,
        "kv",
        "kv to run on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    eprintln!("create across a kill: {seen:?}");
    assert_eq!(running_on(n1, e1), ["default.kv"], "one VM, not two");

    // Two Instances on the same source: two VMs.
    let kv2 = sample(&cl.registry)
        .replace("name: kv", "name: kv2")
        .replace("nodeName: node-1", "nodeName: node-2")
        .replace("16379:6379", "16380:6379");
    let out = kube.apply(&kv2);
    assert!(out.status.success(), "{}", describe(&out));
    watch_until(
        &kube,
        "kv2",
        "kv2 to run on node-2",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-2"),
    );
    assert_eq!(running_on(n2, e2), ["default.kv2"]);

    // A delete while a move runs, and the operator SIGKILLed while its
    // finalizer waits for the move: the VM goes, then the object.
    patch_node(&kube, "kv", "node-2");
    watch_until(
        &kube,
        "kv",
        "the move to start",
        Duration::from_secs(30),
        |i| condition(i, "Migrating")["status"] == "True",
    );
    kube.ok(&["delete", "instance", "kv", "--wait=false"]);
    wait_until(Duration::from_secs(10), "the delete to be seen", || {
        (!kube.instance("kv")["metadata"]["deletionTimestamp"].is_null()).then_some(())
    });
    op.kill().unwrap();
    let _ = op.wait();
    drop(op);
    let op = operator(m, em, &kube, "kubeconfig", "op-a", &extra, "ready");
    wait_until(Duration::from_secs(180), "kv to be gone", || {
        kube.instance("kv").is_null().then_some(())
    });
    assert_eq!(vm_record(m, "default.kv"), Value::Null);
    wait_until(Duration::from_secs(30), "no copy of kv left", || {
        let left: Vec<String> = running_on(n1, e1)
            .into_iter()
            .chain(running_on(n2, e2))
            .filter(|n| n == "default.kv")
            .collect();
        (left.is_empty() && qemu_pids("default.kv").is_empty()).then_some(())
    });
    assert_eq!(running_on(n2, e2), ["default.kv2"], "kv2 untouched");

    // The manager unreachable: Degraded with the reason; once it is back,
    // the retries (with backoff) take the step.
    let mut cl = cl;
    cl.manager.kill().unwrap();
    let _ = cl.manager.wait();
    patch_node(&kube, "kv2", "node-1");
    let (_, k) = watch_until(
        &kube,
        "kv2",
        "kv2 to be Degraded",
        Duration::from_secs(30),
        |i| condition(i, "Degraded")["reason"] == "ManagerUnreachable",
    );
    assert!(
        condition(&k, "Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1400"),
        "{k}"
    );
    assert_eq!(k["status"]["state"], "Running", "still where it was: {k}");
    cl.manager = manager(m, em);
    watch_until(
        &kube,
        "kv2",
        "kv2 to move once the manager is back",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1") && condition(i, "Degraded")["status"] == "False",
    );
    assert_eq!(running_on(n1, e1), ["default.kv2"]);

    kube.ok(&["delete", "instance", "kv2", "--timeout=120s"]);
    assert!(running_on(n1, e1).is_empty());
    drop(op);
    for (n, e) in [(n1, e1), (n2, e2)] {
        let _ = n.ferry(e).args(["stop", "--all", "--discard"]).output();
    }
}

/// The Prometheus counter `name` the operator serves (0 when absent).
fn operator_metric(m: &Host, name: &str) -> u64 {
    let out = m
        .cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{METRICS}/metrics"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// `ferry cluster migrate VM NODE` on the manager's host: a move the
/// operator did not make. Returns when it has moved.
fn cluster_migrate(m: &Host, em: &FerryEnv, vm: &str, node: &str) {
    let out = m
        .ferry(em)
        .args([
            "cluster",
            "--manager",
            "http://127.0.0.1:1400",
            "migrate",
            vm,
            node,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}

/// How long after `since` the Instance `name` first satisfied `done`
/// (looked at as fast as kubectl answers).
fn seen_within(
    kube: &Kube,
    name: &str,
    what: &str,
    since: Instant,
    done: impl Fn(&Value) -> bool,
) -> Duration {
    watch_until(kube, name, what, Duration::from_secs(60), done);
    since.elapsed()
}

/// What happens to a VM on the manager's side (moved with `ferry
/// cluster`, its QEMU killed, the manager restarted) reaches the
/// Instance's status within seconds, through the manager's event stream
/// (the resync is 5 minutes; before the stream it was 30 s): a failed VM
/// is recreated on `spec.nodeName`; `packageRaddr` and `exposes` are
/// immutable (the API server's CEL rules).
#[test]
fn manager_events_reach_the_status_at_once_and_a_failed_vm_is_recreated() {
    // Built before the VM lock: a first build takes minutes, and the
    // test's time limit runs from the lock.
    if !kube_available() {
        return;
    }
    let _lock = vm_lock();
    let hosts = TestHosts::create(&["r", "m", "n1", "n2"]);
    let (m, n1, n2) = (&hosts["m"], &hosts["n1"], &hosts["n2"]);
    let mut envs = Vec::new();
    let mut cl = cluster(&hosts, &mut envs, &["n1", "n2"]);
    let (e1, e2, em) = (&envs[0], &envs[1], &envs[3]);
    let kube = Kube::start(m, false);
    kube.install_crd();
    let extra = ["--metrics-listen", METRICS, "--lease-namespace", "default"];
    let op = operator(m, em, &kube, "kubeconfig", "op-a", &extra, "ready");
    let limit = Duration::from_secs(5);

    let out = kube.apply(&sample(&cl.registry));
    assert!(out.status.success(), "{}", describe(&out));
    watch_until(
        &kube,
        "kv",
        "kv to run on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    assert!(operator_metric(m, "ferry_operator_manager_event_stream_up") == 1);

    // packageRaddr and exposes cannot change: the API server says why.
    for patch in [
        r#"{"spec":{"packageRaddr":"10.9.9.9:7070"}}"#,
        r#"{"spec":{"exposes":["16390:6379"]}}"#,
    ] {
        let out = kube.kubectl(&["patch", "instance", "kv", "--type", "merge", "-p", patch]);
        assert!(!out.status.success(), "{patch}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is immutable") && err.contains("delete the Instance"),
            "{err}"
        );
    }
    let out = kube.kubectl(&[
        "patch",
        "instance",
        "kv",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/spec/exposes"}]"#,
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(
        kube.instance("kv")["spec"]["packageRaddr"],
        cl.registry.as_str()
    );

    // A move made with `ferry cluster`, behind the operator's back: the
    // status shows it at once; then the operator moves the VM back to
    // spec.nodeName.
    cluster_migrate(m, em, "default.kv", "node-2");
    let moved = Instant::now();
    let took = seen_within(
        &kube,
        "kv",
        "the status to show the move to node-2",
        moved,
        |i| i["status"]["nodeName"] == "node-2",
    );
    eprintln!("a move with ferry cluster reached the status in {took:?}");
    assert!(took < limit, "the move reached the status after {took:?}");
    watch_until(
        &kube,
        "kv",
        "kv to be back on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    wait_until(Duration::from_secs(30), "one copy, on node-1", || {
        (running_on(n1, e1) == ["default.kv"] && running_on(n2, e2).is_empty()).then_some(())
    });

    // Its QEMU killed: the manager records the VM failed, and the operator
    // recreates it on node-1 from its registry at once.
    // (The copy the VM left on node-2 may take a moment to go.)
    let pids = wait_until(Duration::from_secs(30), "one QEMU for kv", || {
        let pids = qemu_pids("default.kv");
        (pids.len() == 1).then_some(pids)
    });
    ferry_test_support::send_signal(pids[0], libc::SIGKILL);
    let killed = Instant::now();
    let took = seen_within(
        &kube,
        "kv",
        "the failure to reach the status",
        killed,
        |i| i["status"]["recreations"] == 1,
    );
    eprintln!("a failed VM reached the status in {took:?} (heartbeats every 1 s)");
    assert!(
        took < limit,
        "the failure reached the status after {took:?}"
    );
    let (seen, kv) = watch_until(
        &kube,
        "kv",
        "kv to run again",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    eprintln!("recreated: {seen:?}");
    assert_eq!(kv["status"]["recreations"], 1, "{kv}");
    assert!(kv["status"]["lastRecreateTime"].is_string(), "{kv}");
    assert_eq!(running_on(n1, e1), ["default.kv"], "one VM, not two");
    wait_until(Duration::from_secs(30), "one QEMU for kv", || {
        (qemu_pids("default.kv").len() == 1).then_some(())
    });
    let evs = events(&kube, "kv");
    assert!(evs.iter().any(|e| e == "Recreating"), "{evs:?}");
    assert_eq!(vm_record(m, "default.kv")["state"], "running");

    // The manager restarted: the operator connects again (with backoff)
    // and the stream drives it as before.
    let connects = operator_metric(m, "ferry_operator_manager_event_stream_connects_total");
    cl.manager.kill().unwrap();
    let _ = cl.manager.wait();
    wait_until(Duration::from_secs(10), "the stream to drop", || {
        (operator_metric(m, "ferry_operator_manager_event_stream_up") == 0).then_some(())
    });
    cl.manager = manager(m, em);
    wait_until(
        Duration::from_secs(60),
        "the operator to connect again",
        || {
            (operator_metric(m, "ferry_operator_manager_event_stream_connects_total") > connects)
                .then_some(())
        },
    );
    wait_until(
        Duration::from_secs(60),
        "the workers to report again",
        || (vm_record(m, "default.kv")["state"] == "running").then_some(()),
    );
    cluster_migrate(m, em, "default.kv", "node-2");
    let moved = Instant::now();
    let took = seen_within(
        &kube,
        "kv",
        "the status to show the move to node-2",
        moved,
        |i| i["status"]["nodeName"] == "node-2",
    );
    eprintln!("after a manager restart, a move reached the status in {took:?}");
    assert!(took < limit, "the move reached the status after {took:?}");
    watch_until(
        &kube,
        "kv",
        "kv to be back on node-1",
        Duration::from_secs(180),
        |i| running_on_node(i, "node-1"),
    );
    assert!(operator_metric(m, "ferry_operator_manager_events_total") > 0);

    kube.ok(&["delete", "instance", "kv", "--timeout=120s"]);
    assert_eq!(vm_record(m, "default.kv"), Value::Null);
    wait_until(Duration::from_secs(30), "no VM left", || {
        (running_on(n1, e1).is_empty() && running_on(n2, e2).is_empty()).then_some(())
    });
    drop(op);
    for (n, e) in [(n1, e1), (n2, e2)] {
        let _ = n.ferry(e).args(["stop", "--all", "--discard"]).output();
    }
}

/// An RFC 3339 UTC time as the operator writes it (jiff: as many fraction
/// digits as needed, none for a whole second) in a form that sorts as
/// text: "…:24Z" and "…:23.39Z" compared as written put "…:24.045Z"
/// before "…:24Z" and "…:23.39Z" after "…:23.391Z".
fn time_key(t: &Value) -> String {
    let t = t.as_str().expect("a time").trim_end_matches('Z');
    let (whole, fraction) = t.split_once('.').unwrap_or((t, ""));
    format!("{whole}.{fraction:0<9}")
}
