//! The control plane on test hosts (network namespaces with their own
//! addresses): a registry on `r`, a manager on `m`, workers on `n1`, `n2`
//! and `n3`, a Redis client on `client`.
//!
//! - The seed's curl sequence, verbatim: create on node-1, move to node-2
//!   and back, delete; the listings and the hosts' `ferry ps` agree at
//!   each step, and no VM is left in two places.
//! - A Redis writer keeps writing while the instance moves 1 → 2 → 3 → 1,
//!   the manager is SIGKILLed in the middle of a move and restarted, and a
//!   worker is SIGKILLed (its instance turns `lost`, the VM keeps running)
//!   and restarted (it adopts the VM): no acknowledged write is lost.
//! - Bad input: tokens, unknown nodes and instances, malformed addresses,
//!   a source that is nothing, no room, a node name held by another live
//!   worker, a plain listener beyond loopback.
//! - TLS: the seed's curl sequence over `https://` (`--cacert`); plain
//!   HTTP to a TLS listener, a worker without the CA or with another CA,
//!   and (with `--client-ca`) clients without a certificate are refused,
//!   and nothing is created.
//! - Suspend and resume through the API: a Redis key written before is
//!   there after, and no QEMU runs while it is suspended. Then its Redis
//!   is killed in the guest: a `guest-error` event names the instance
//!   (once), `ferry cluster watch` shows it, the instance keeps it.

use std::net::SocketAddr;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_test_support::{
    describe, qemu_pids, spawn_until, vm_lock, wait_until, FerryEnv, Host, KillOnDrop, TestHosts,
};
use serde_json::Value;

mod common;
use common::hosts::{curl, registry, start};
use common::kv::{in_netns, missing, writer, Redis, Writes};
use common::{env, recipe_package};

const REGISTRY_PORT: u16 = 7070;
const LINK_PORT: u16 = 1399;
const REDIS_PORT: u16 = 16379;
const TOKEN: &str = "control-plane-test-token-0123456789";

/// `ferry manager` on `m`, its workers' link on `m`'s address in plain
/// HTTP (`--insecure`) between test hosts.
fn manager(m: &Host, env: &FerryEnv, extra: &[&str]) -> KillOnDrop {
    let mut args = vec!["--insecure"];
    args.extend_from_slice(extra);
    manager_with(m, env, &args)
}

/// `ferry manager` on `m` with the flags `extra` (say how it may listen
/// on `m`'s address: `--insecure`, or TLS).
fn manager_with(m: &Host, env: &FerryEnv, extra: &[&str]) -> KillOnDrop {
    let link = format!("{}:{LINK_PORT}", m.addr());
    let store = env.state.path().join("manager-store");
    let mut args = vec![
        "manager",
        "--workers-listen",
        &link,
        "--store",
        store.to_str().unwrap(),
        "--op-timeout-s",
        "300",
    ];
    args.extend_from_slice(extra);
    start(m, env, &args, "listening on ")
}

fn worker(n: &Host, env: &FerryEnv, name: &str, m: &Host, extra: &[&str]) -> KillOnDrop {
    let link = format!("{}:{LINK_PORT}", m.addr());
    worker_at(n, env, name, &link, extra)
}

/// `ferry worker` on `n` for the manager's link at `plane`.
fn worker_at(n: &Host, env: &FerryEnv, name: &str, plane: &str, extra: &[&str]) -> KillOnDrop {
    let mut args = vec![
        "worker",
        "--name",
        name,
        "--host-interface",
        n.interface(),
        "--control-plane",
        plane,
        "--lease-s",
        "3",
        "--insecure",
    ];
    args.extend_from_slice(extra);
    start(n, env, &args, "registered as node ")
}

/// The HTTP status of `url` inside `host`, or `None` if nothing answered
/// (a manager changing from follower to leader drops connections).
fn status_of(host: &Host, url: &str) -> Option<u16> {
    let out = host
        .cmd("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `curl` that must answer 200; its body.
fn ok(host: &Host, args: &[&str]) -> Value {
    let (status, body) = curl(host, args);
    assert_eq!(status, 200, "curl {args:?} answered {status}: {body}");
    body
}

/// The names of the instances the manager lists on `node`.
fn on_node(m: &Host, node: &str) -> Vec<String> {
    let list = ok(
        m,
        &[&format!("http://localhost:1400/nodes/{node}/instances")],
    );
    list.as_array()
        .expect("a JSON list")
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
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

/// A command's standard output, line by line, as it comes.
struct Follow {
    _child: KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Mutex<Vec<String>>,
}

/// Starts `cmd` and follows what it prints (its standard error as lines
/// that start with `stderr: `, for the failure message).
fn follow(cmd: &mut std::process::Command) -> Follow {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, lines) = std::sync::mpsc::channel();
    fn forward(
        from: impl std::io::Read + Send + 'static,
        prefix: &'static str,
        tx: std::sync::mpsc::Sender<String>,
    ) {
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(from)) {
                let Ok(line) = line else { break };
                if tx.send(format!("{prefix}{line}")).is_err() {
                    break;
                }
            }
        });
    }
    forward(child.stdout.take().expect("piped"), "", tx.clone());
    forward(child.stderr.take().expect("piped"), "stderr: ", tx);
    Follow {
        _child: KillOnDrop::new(child),
        lines,
        seen: Mutex::new(Vec::new()),
    }
}

impl Follow {
    /// The first line (from the start) that `f` accepts, or a panic with
    /// every line after `timeout`.
    fn wait_for<T>(&self, timeout: Duration, what: &str, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = self.seen.lock().unwrap();
        if let Some(v) = seen.iter().find_map(|l| f(l)) {
            return v;
        }
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = f(&line);
                    seen.push(line);
                    if let Some(v) = found {
                        return v;
                    }
                }
                Err(_) => panic!("no {what} within {timeout:?}; it printed: {seen:#?}"),
            }
        }
    }

    /// Every line printed so far.
    fn lines_so_far(&self) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(self.lines.try_iter());
        seen.clone()
    }
}

/// Drops every VM a worker's host still runs.
fn discard_all(n: &Host, env: &FerryEnv) {
    let _ = n.ferry(env).args(["stop", "--all", "--discard"]).output();
}

#[test]
fn the_reference_curl_sequence_creates_moves_and_deletes() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "m", "n1", "n2"]);
    let (r, m, n1, n2) = (&hosts["r"], &hosts["m"], &hosts["n1"], &hosts["n2"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em, e1, e2) = (
        r.ferry_env(bin),
        m.ferry_env(bin),
        n1.ferry_env(bin),
        n2.ferry_env(bin),
    );
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let _manager = manager(m, &em, &[]);
    let _w1 = worker(n1, &e1, "node-1", m, &[]);
    let _w2 = worker(n2, &e2, "node-2", m, &[]);

    // curl http://localhost:1400/nodes
    let nodes = ok(m, &["http://localhost:1400/nodes"]);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node-1", "node-2"], "{nodes}");
    assert!(on_node(m, "node-1").is_empty());

    // Create from the registry on node-1.
    let registry_addr = format!("{}:{REGISTRY_PORT}", r.addr());
    let a1 = ok(
        m,
        &[
            "-X",
            "POST",
            &format!("http://localhost:1400/nodes/node-1/instances/{registry_addr}"),
        ],
    );
    let a1 = a1
        .as_str()
        .expect("the new instance's address, a JSON string");
    assert!(a1.starts_with(&n1.addr().to_string()), "{a1} is on node-1");
    let on1 = on_node(m, "node-1");
    assert_eq!(on1.len(), 1, "{on1:?}");
    let name = on1[0].clone();
    assert_eq!(running_on(n1, &e1), std::slice::from_ref(&name));

    // A move to where it is already is refused, and changes nothing.
    let (status, problem) = curl(
        m,
        &[
            "-X",
            "POST",
            &format!("http://localhost:1400/nodes/node-1/instances/{a1}"),
        ],
    );
    assert_eq!(status, 409, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("already"),
        "{problem}"
    );

    // Migrate it to node-2: its address is the source.
    let a2 = ok(
        m,
        &[
            "-X",
            "POST",
            &format!("http://localhost:1400/nodes/node-2/instances/{a1}"),
        ],
    );
    let a2 = a2.as_str().unwrap();
    assert!(a2.starts_with(&n2.addr().to_string()), "{a2} is on node-2");
    assert!(on_node(m, "node-1").is_empty());
    assert_eq!(on_node(m, "node-2"), std::slice::from_ref(&name));
    assert_eq!(running_on(n2, &e2), std::slice::from_ref(&name));
    // Gone from its source: never in two places.
    wait_until(Duration::from_secs(30), "the VM to leave node-1", || {
        running_on(n1, &e1).is_empty().then_some(())
    });

    // And back to node-1.
    let a3 = ok(
        m,
        &[
            "-X",
            "POST",
            &format!("http://localhost:1400/nodes/node-1/instances/{a2}"),
        ],
    );
    let a3 = a3.as_str().unwrap();
    assert!(a3.starts_with(&n1.addr().to_string()), "{a3}");
    assert_eq!(on_node(m, "node-1"), std::slice::from_ref(&name));
    assert!(on_node(m, "node-2").is_empty());
    wait_until(Duration::from_secs(30), "the VM to leave node-2", || {
        running_on(n2, &e2).is_empty().then_some(())
    });
    let detail = ok(m, &[&format!("http://localhost:1400/v1/instances/{name}")]);
    let moves = detail["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "{detail}");
    assert!(moves.iter().all(|mv| mv["ok"] == true), "{detail}");

    // Delete it.
    ok(
        m,
        &[
            "-X",
            "DELETE",
            &format!("http://localhost:1400/nodes/node-1/instances/{a3}"),
        ],
    );
    assert!(on_node(m, "node-1").is_empty());
    assert!(running_on(n1, &e1).is_empty());
    assert!(qemu_pids(&name).is_empty(), "no QEMU left for {name}");
    let (status, _) = curl(m, &[&format!("http://localhost:1400/v1/instances/{name}")]);
    assert_eq!(status, 404);
    discard_all(n1, &e1);
    discard_all(n2, &e2);
}

/// The manager's view of instance `name`, through `ferry cluster`.
fn instance(m: &Host, em: &FerryEnv, name: &str) -> Value {
    let out = m
        .ferry(em)
        .args(["cluster", "--json", "instances"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn cluster(m: &Host, em: &FerryEnv, args: &[&str]) -> Output {
    m.ferry(em)
        .arg("cluster")
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_redis_writer_loses_nothing_while_the_instance_moves_and_the_manager_and_a_worker_die() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "m", "n1", "n2", "n3", "client"]);
    let (r, m) = (&hosts["r"], &hosts["m"]);
    let ns = [&hosts["n1"], &hosts["n2"], &hosts["n3"]];
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em) = (r.ferry_env(bin), m.ferry_env(bin));
    let envs: Vec<FerryEnv> = ns.iter().map(|n| n.ferry_env(bin)).collect();
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let mut mgr = manager(m, &em, &[]);
    let mut workers: Vec<KillOnDrop> = ns
        .iter()
        .zip(&envs)
        .enumerate()
        .map(|(i, (n, e))| worker(n, e, &format!("node-{}", i + 1), m, &[]))
        .collect();

    // Create it on node-1 with its Redis port exposed on the node.
    let create = cluster(
        m,
        &em,
        &[
            "create",
            &format!("{}:{REGISTRY_PORT}", r.addr()),
            "--node",
            "node-1",
            "--name",
            "kv",
            "--expose",
            &format!("{REDIS_PORT}:6379"),
        ],
    );
    assert!(create.status.success(), "{}", describe(&create));
    let created: Value = serde_json::from_slice(&create.stdout).unwrap();
    assert_eq!(created["state"], "running", "{created}");
    assert_eq!(
        created["exposes"][0],
        format!("{}:{REDIS_PORT}:6379", ns[0].addr()),
        "clients find it through the API"
    );

    // The writer follows it from node to node.
    let targets: Vec<SocketAddr> = ns
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

    // 1 → 2, and a second move while it runs is refused.
    let mv = {
        let mut c = m.ferry(&em);
        c.args(["cluster", "--json", "migrate", "kv", "node-2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    wait_until(Duration::from_secs(30), "the move to start", || {
        (instance(m, &em, "kv")["state"] == "migrating").then_some(())
    });
    let second = cluster(m, &em, &["migrate", "kv", "node-3"]);
    assert_eq!(second.status.code(), Some(3), "{}", describe(&second));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("409"),
        "{}",
        describe(&second)
    );
    let out = mv.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(instance(m, &em, "kv")["node"], "node-2");
    let before = acked();
    wait_until(Duration::from_secs(60), "writes on node-2", || {
        (acked() > before + 50).then_some(())
    });

    // 2 → 3 with the manager SIGKILLed in the middle, then restarted on
    // the same store: the move completes (or not) by itself, and the
    // restarted manager settles the record on what the workers report.
    let mv = {
        let mut c = m.ferry(&em);
        c.args(["cluster", "--json", "migrate", "kv", "node-3"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    wait_until(Duration::from_secs(30), "the move to start", || {
        (instance(m, &em, "kv")["state"] == "migrating").then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    mgr.kill().unwrap();
    let _ = mv.wait_with_output();
    drop(mgr);
    mgr = manager(m, &em, &[]);
    let settled = wait_until(Duration::from_secs(120), "the record to settle", || {
        let i = instance(m, &em, "kv");
        (i["state"] == "running").then_some(i)
    });
    let node = settled["node"].as_str().unwrap().to_string();
    assert!(node == "node-3" || node == "node-2", "{settled}");
    // The source of a move tears its copy down a moment after the switch.
    let runs = wait_until(
        Duration::from_secs(30),
        "the VM to run in one place",
        || {
            let runs: Vec<usize> = ns
                .iter()
                .zip(&envs)
                .enumerate()
                .filter(|(_, (n, e))| running_on(n, e).contains(&"kv".to_string()))
                .map(|(i, _)| i)
                .collect();
            assert!(!runs.is_empty(), "the VM runs nowhere");
            (runs.len() == 1).then_some(runs)
        },
    );
    assert_eq!(
        format!("node-{}", runs[0] + 1),
        node,
        "the record says where it runs"
    );

    // → node-1.
    let back = cluster(m, &em, &["migrate", "kv", "node-1"]);
    assert!(back.status.success(), "{}", describe(&back));
    let before = acked();
    wait_until(Duration::from_secs(60), "writes on node-1", || {
        (acked() > before + 50).then_some(())
    });

    // Worker node-1 SIGKILLed: kv turns lost within the lease, its VM runs
    // on (the writer keeps being answered), and the restarted worker adopts
    // it.
    workers[0].kill().unwrap();
    let lost = wait_until(Duration::from_secs(15), "kv to be lost", || {
        let i = instance(m, &em, "kv");
        (i["state"] == "lost").then_some(i)
    });
    assert!(lost["reason"].as_str().unwrap().contains("lease"), "{lost}");
    // The VM itself keeps running (the copy the last move left behind on
    // node-3 may still be going away).
    assert!(!qemu_pids("kv").is_empty(), "the VM itself keeps running");
    let before = acked();
    wait_until(
        Duration::from_secs(30),
        "writes while the worker is dead",
        || (acked() > before + 20).then_some(()),
    );
    workers[0] = worker(ns[0], &envs[0], "node-1", m, &[]);
    wait_until(Duration::from_secs(30), "kv to run again", || {
        (instance(m, &em, "kv")["state"] == "running").then_some(())
    });

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
    let deleted = cluster(m, &em, &["delete", "kv"]);
    assert!(deleted.status.success(), "{}", describe(&deleted));
    assert!(qemu_pids("kv").is_empty());
    drop(mgr);
    for (n, e) in ns.iter().zip(&envs) {
        discard_all(n, e);
    }
}

#[test]
fn bad_input_gets_a_status_and_a_problem_that_names_the_fix() {
    let _lock = vm_lock();
    let hosts = TestHosts::create(&["r", "m", "n1", "n2"]);
    let (r, m, n1, n2) = (&hosts["r"], &hosts["m"], &hosts["n1"], &hosts["n2"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (em, e1, e2) = (m.ferry_env(bin), n1.ferry_env(bin), n2.ferry_env(bin));
    let token_file = em.state.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let tf = token_file.to_str().unwrap();

    // A plain listener beyond loopback needs --insecure.
    let out = m
        .ferry(&em)
        .args([
            "manager",
            "--workers-listen",
            &format!("{}:{LINK_PORT}", m.addr()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--insecure"),
        "{}",
        describe(&out)
    );

    let _manager = manager(m, &em, &["--token-file", tf]);
    // A worker without the token is refused, and nothing is created.
    let out = n1
        .ferry(&e1)
        .args([
            "worker",
            "--name",
            "node-1",
            "--host-interface",
            "eth0",
            "--insecure",
            "--control-plane",
            &format!("{}:{LINK_PORT}", m.addr()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        describe(&out)
    );

    let _w1 = worker(
        n1,
        &e1,
        "node-1",
        m,
        &["--token-file", tf, "--capacity-mib", "100"],
    );
    // Another live worker cannot take its name.
    let out = n2
        .ferry(&e2)
        .args([
            "worker",
            "--name",
            "node-1",
            "--host-interface",
            "eth0",
            "--token-file",
            tf,
            "--insecure",
            "--control-plane",
            &format!("{}:{LINK_PORT}", m.addr()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("held by another live worker"),
        "{}",
        describe(&out)
    );

    let auth = format!("Authorization: Bearer {TOKEN}");
    let api = |args: &[&str]| {
        let mut all = vec!["-H", auth.as_str()];
        all.extend_from_slice(args);
        curl(m, &all)
    };
    // Tokens.
    let (status, p) = curl(m, &["http://localhost:1400/nodes"]);
    assert_eq!(status, 401, "{p}");
    let (status, _) = curl(
        m,
        &[
            "-H",
            "Authorization: Bearer wrong-token-wrong-token",
            "http://localhost:1400/nodes",
        ],
    );
    assert_eq!(status, 401);
    let (status, nodes) = api(&["http://localhost:1400/nodes"]);
    assert_eq!(status, 200);
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");

    let cases: Vec<(Vec<String>, u16, &str)> = vec![
        (
            vec!["http://localhost:1400/nodes/nope/instances".into()],
            404,
            "no node is named 'nope'",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "http://localhost:1400/nodes/node-1/instances/not-an-address".into(),
            ],
            400,
            "not an address",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                format!(
                    "http://localhost:1400/nodes/node-1/instances/{}:9",
                    r.addr()
                ),
            ],
            400,
            "neither an instance",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "http://localhost:1400/nodes/nope/instances/10.0.0.1:80".into(),
            ],
            404,
            "no node",
        ),
        (
            vec![
                "-X".into(),
                "DELETE".into(),
                "http://localhost:1400/v1/instances/nope".into(),
            ],
            404,
            "no instance",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-d".into(),
                "{\"node\":\"node-1\"}".into(),
                "http://localhost:1400/v1/instances/nope/migrate".into(),
            ],
            404,
            "no instance",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-d".into(),
                "{oops".into(),
                "http://localhost:1400/v1/instances".into(),
            ],
            400,
            "request body",
        ),
    ];
    for (args, want, says) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, problem) = api(&refs);
        assert_eq!(status, want, "{args:?}: {problem}");
        assert_eq!(problem["status"], want, "problem JSON: {problem}");
        assert!(
            problem["detail"].as_str().unwrap_or("").contains(says),
            "{args:?}: {problem}"
        );
    }
    // No room: node-1 offers 100 MiB; the package needs more. Served by a
    // real registry.
    let er = r.ferry_env(bin);
    let pkg = recipe_package(&env(), "redis");
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let (status, problem) = api(&[
        "-X",
        "POST",
        &format!(
            "http://localhost:1400/nodes/node-1/instances/{}:{REGISTRY_PORT}",
            r.addr()
        ),
    ]);
    assert_eq!(status, 409, "{problem}");
    assert!(problem["free_mib"].as_u64().unwrap() <= 100, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("MiB free"),
        "{problem}"
    );
    let (status, list) = api(&["http://localhost:1400/v1/instances"]);
    assert_eq!(status, 200);
    assert_eq!(list, Value::Array(vec![]), "nothing was created");
    assert!(running_on(n1, &e1).is_empty());
}

/// The etcd server (Debian trixie's, fetched by `scripts/etcd.sh`).
fn etcd_binary() -> String {
    let script = ferry_test_support::workspace_root().join("scripts/etcd.sh");
    let out = std::process::Command::new(&script)
        .arg("path")
        .output()
        .expect("scripts/etcd.sh");
    assert!(
        out.status.success(),
        "scripts/etcd.sh could not provide etcd (it needs the Debian mirror): {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The stored record of instance `name` in etcd (the manager's own view,
/// with what the API never shows: its credential).
fn etcd_record(e: &Host, client_url: &str, name: &str) -> Value {
    let script = format!(
        "k=$(printf %s /ferry/instances/{name} | base64 -w0); curl -sS --max-time 10 -X POST {client_url}/v3/kv/range -d \"{{\\\"key\\\":\\\"$k\\\"}}\" | sed -n 's/.*\"value\":\"\\([^\"]*\\)\".*/\\1/p' | base64 -d"
    );
    let out = e.cmd("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)))
}

#[test]
fn with_etcd_a_follower_takes_over_when_the_leader_dies() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let etcd = etcd_binary();
    let hosts = TestHosts::create(&["e", "r", "m1", "m2", "n1", "n2"]);
    let (e, r, m1, m2, n1, n2) = (
        &hosts["e"],
        &hosts["r"],
        &hosts["m1"],
        &hosts["m2"],
        &hosts["n1"],
        &hosts["n2"],
    );
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em1, em2, e1, e2) = (
        r.ferry_env(bin),
        m1.ferry_env(bin),
        m2.ferry_env(bin),
        n1.ferry_env(bin),
        n2.ferry_env(bin),
    );
    let data = tempfile::tempdir().unwrap();
    let client_url = format!("http://{}:2379", e.addr());
    let mut etcd_cmd = e.cmd(&etcd);
    etcd_cmd
        .args(["--data-dir", data.path().to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
        .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
        .args(["--initial-cluster", "default=http://127.0.0.1:2380"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _etcd = KillOnDrop::new(etcd_cmd.spawn().unwrap());
    wait_until(Duration::from_secs(30), "etcd to serve", || {
        e.cmd("curl")
            .args(["-sf", "--max-time", "2", &format!("{client_url}/health")])
            .output()
            .unwrap()
            .status
            .success()
            .then_some(())
    });
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    // Each manager listens on every address of its host (loopback for
    // the checks below, its own for the other hosts) and says at which
    // URL clients reach it.
    let (url1, url2) = (
        format!("http://{}:1400", m1.addr()),
        format!("http://{}:1400", m2.addr()),
    );
    let etcd_flags = |url: &str| -> Vec<String> {
        [
            "--etcd",
            client_url.as_str(),
            "--leader-ttl-s",
            "3",
            "--listen",
            "0.0.0.0:1400",
            "--api-url",
            url,
        ]
        .map(String::from)
        .to_vec()
    };
    let f1 = etcd_flags(&url1);
    let f1: Vec<&str> = f1.iter().map(String::as_str).collect();
    let mut leader = manager(m1, &em1, &f1);
    wait_until(Duration::from_secs(30), "m1 to lead", || {
        (status_of(m1, "http://localhost:1400/v1/nodes") == Some(200)).then_some(())
    });
    let f2 = etcd_flags(&url2);
    let f2: Vec<&str> = f2.iter().map(String::as_str).collect();
    let _follower = manager(m2, &em2, &f2);
    // A follower redirects API requests to the leader (307 keeps the
    // method and the body); curl -L and `ferry cluster` follow it. (Until
    // its first campaign has read who leads, a few milliseconds after it
    // listens, it answers 503 "none yet".)
    wait_until(Duration::from_secs(10), "m2 to know the leader", || {
        (status_of(m2, "http://localhost:1400/v1/nodes") == Some(307)).then_some(())
    });
    let out = m2
        .cmd("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg("http://localhost:1400/v1/nodes?x=1")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("307 {url1}/v1/nodes?x=1"),
        "{}",
        describe(&out)
    );
    let (status, nodes) = curl(m2, &["-L", "http://localhost:1400/v1/nodes"]);
    assert_eq!(status, 200, "{nodes}");

    let plane = format!("{}:{LINK_PORT},{}:{LINK_PORT}", m1.addr(), m2.addr());
    let mut workers = Vec::new();
    for (n, env, name) in [(n1, &e1, "node-1"), (n2, &e2, "node-2")] {
        let mut worker_cmd = n.ferry(env);
        worker_cmd
            .args([
                "worker",
                "--name",
                name,
                "--host-interface",
                "eth0",
                "--lease-s",
                "3",
            ])
            .args(["--control-plane", &plane, "--insecure"])
            .current_dir(env.state.path());
        workers.push(spawn_until(worker_cmd, "registered as node ", Duration::from_secs(60)).0);
    }
    let created = ok(
        m1,
        &[
            "-X",
            "POST",
            &format!(
                "http://localhost:1400/nodes/node-1/instances/{}:{REGISTRY_PORT}",
                r.addr()
            ),
        ],
    );
    let first = created.as_str().unwrap().to_string();
    let name = ok(m1, &["http://localhost:1400/v1/instances"])[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let spent = etcd_record(e, &client_url, &name)["token"]
        .as_str()
        .unwrap()
        .to_string();

    // A move through the follower (redirected to the leader), with
    // `ferry cluster`: the instance takes a fresh credential with it.
    let out = m2
        .ferry(&em2)
        .args([
            "cluster",
            "--json",
            "--manager",
            &url2,
            "migrate",
            &name,
            "node-2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let moved: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(moved["node"], "node-2", "{moved}");
    let address = moved["address"].as_str().unwrap().to_string();
    assert_ne!(address, first);
    let rec = etcd_record(e, &client_url, &name);
    let now = rec["token"].as_str().unwrap();
    assert_ne!(now, spent, "each move has its own credential");
    assert!(rec.get("pending_token").is_none(), "{rec}");

    // The first move's credential replayed against the instance's new
    // address: refused, and the VM stays where it is.
    let thief = n1.ferry_env(bin);
    let spent_file = thief.state.path().join("spent-token");
    std::fs::write(&spent_file, &spent).unwrap();
    let err_file = thief.state.path().join("peer.err");
    let mut replay = n1.ferry(&thief);
    replay
        .args(["peer", "--from", &address, "--insecure", "--name", "stolen"])
        .arg("--migrate-token-file")
        .arg(&spent_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap());
    let mut replay = KillOnDrop::new(replay.spawn().unwrap());
    let status = wait_until(Duration::from_secs(120), "the replay to end", || {
        replay.try_wait().unwrap()
    });
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(!status.success(), "a spent credential moved the VM: {err}");
    assert!(err.contains("wrong token"), "{err}");
    assert_eq!(
        running_on(n2, &e2),
        std::slice::from_ref(&name),
        "the VM stays on node-2"
    );
    assert!(running_on(n1, &thief).is_empty());

    // The leader dies; the follower takes over within a few seconds and
    // serves the same records; the workers find it.
    leader.kill().unwrap();
    let _ = leader.wait();
    let took_over = std::time::Instant::now();
    wait_until(Duration::from_secs(20), "m2 to serve", || {
        (status_of(m2, "http://localhost:1400/v1/instances") == Some(200)).then_some(())
    });
    let list = ok(m2, &["http://localhost:1400/v1/instances"]);
    let waited = took_over.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "m2 took over after {waited:?}"
    );
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["address"], address.as_str(), "{list}");
    wait_until(Duration::from_secs(30), "the nodes to report to m2", || {
        let nodes = ok(m2, &["http://localhost:1400/v1/nodes"]);
        (nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "ready")
            && on_node(m2, "node-2").len() == 1)
            .then_some(())
    });
    let i = ok(m2, &["http://localhost:1400/v1/instances"]);
    assert_eq!(i[0]["state"], "running", "{i}");
    ok(
        m2,
        &[
            "-X",
            "DELETE",
            &format!("http://localhost:1400/v1/instances/{name}"),
        ],
    );
    assert!(running_on(n2, &e2).is_empty());
    // Its supervisor (which refused the replay) ends too: nothing is left.
    wait_until(
        Duration::from_secs(30),
        "the VM's supervisor to end",
        || {
            let out = std::process::Command::new("pgrep")
                .args(["-f", &format!("supervise --ready-fd [0-9]+ {name}$")])
                .output()
                .unwrap();
            (out.stdout.is_empty() && qemu_pids(&name).is_empty()).then_some(())
        },
    );
    drop(workers);
    discard_all(n1, &e1);
    discard_all(n2, &e2);
}

/// `ferry tls init DIR` on the test host `m` (server certificate valid for
/// its address too): the directory.
fn tls_init(m: &Host, env: &FerryEnv, name: &str) -> std::path::PathBuf {
    let dir = env.state.path().join(name);
    let out = env.run(&[
        "tls",
        "init",
        dir.to_str().unwrap(),
        "--san",
        &m.addr().to_string(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    dir
}

/// A worker on `n` that must be refused at once (exit 3) with a line
/// holding `says`.
fn refused_worker(n: &Host, env: &FerryEnv, plane: &str, extra: &[&str], says: &str) {
    let out = n
        .ferry(env)
        .args([
            "worker",
            "--name",
            "node-x",
            "--host-interface",
            n.interface(),
            "--insecure",
            "--control-plane",
            plane,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(says),
        "{}",
        describe(&out)
    );
}

/// Whether `curl ARGS` inside `host` fails to get any HTTP answer.
fn curl_fails(host: &Host, args: &[&str]) -> bool {
    let out = host
        .cmd("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null"])
        .args(args)
        .output()
        .unwrap();
    !out.status.success()
}

#[test]
fn tls_refuses_plain_http_wrong_cas_and_missing_client_certificates() {
    let hosts = TestHosts::create(&["m", "n1"]);
    let (m, n1) = (&hosts["m"], &hosts["n1"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (em, e1) = (m.ferry_env(bin), n1.ferry_env(bin));
    let tls = tls_init(m, &em, "tls");
    let other = tls_init(m, &em, "other-ca");
    let file = |d: &std::path::Path, f: &str| d.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (
        file(&tls, "ca.crt"),
        file(&tls, "server.crt"),
        file(&tls, "server.key"),
    );
    let (client_cert, client_key) = (file(&tls, "client.crt"), file(&tls, "client.key"));
    // Both listeners speak only TLS, with client certificates required: no
    // --insecure needed beyond loopback.
    let _manager = manager_with(
        m,
        &em,
        &["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca],
    );
    let plane = format!("https://{}:{LINK_PORT}", m.addr());
    let api = "https://localhost:1400/v1/nodes";

    // Plain HTTP to either TLS listener gets no answer.
    assert!(curl_fails(m, &["http://localhost:1400/nodes"]));
    assert!(curl_fails(
        m,
        &[&format!("http://{}:{LINK_PORT}/link/v1/register", m.addr())]
    ));
    // A client without a certificate is refused in the handshake.
    assert!(curl_fails(m, &["--cacert", &ca, api]));
    // A worker without the CA, with another CA, or without a client
    // certificate is refused (exit 3, one line naming the fix).
    refused_worker(n1, &e1, &plane, &[], "--ca");
    refused_worker(
        n1,
        &e1,
        &plane,
        &[
            "--ca",
            &file(&other, "ca.crt"),
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
        ],
        "TLS handshake failed",
    );
    refused_worker(n1, &e1, &plane, &["--ca", &ca], "TLS handshake failed");
    // Nothing was registered, nothing created.
    let nodes = ok(
        m,
        &[
            "--cacert",
            &ca,
            "--cert",
            &client_cert,
            "--key",
            &client_key,
            api,
        ],
    );
    assert_eq!(nodes, Value::Array(vec![]), "{nodes}");
    assert!(running_on(n1, &e1).is_empty());

    // With all three a worker registers (a bare HOST:PORT is https:// with
    // --ca), and `ferry cluster` sees it.
    let _w1 = worker_at(
        n1,
        &e1,
        "node-1",
        &format!("{}:{LINK_PORT}", m.addr()),
        &[
            "--ca",
            &ca,
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
        ],
    );
    let out = m
        .ferry(&em)
        .args([
            "cluster",
            "--json",
            "--manager",
            "https://localhost:1400",
            "--ca",
            &ca,
        ])
        .args([
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
            "nodes",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes[0]["name"], "node-1", "{nodes}");
    // `ferry cluster` without its certificate: refused, naming the fix.
    let out = m
        .ferry(&em)
        .args([
            "cluster",
            "--manager",
            "https://localhost:1400",
            "--ca",
            &ca,
            "nodes",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS handshake failed"),
        "{}",
        describe(&out)
    );
}

#[test]
fn the_reference_curl_sequence_over_https() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "m", "n1", "n2"]);
    let (r, m, n1, n2) = (&hosts["r"], &hosts["m"], &hosts["n1"], &hosts["n2"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em, e1, e2) = (
        r.ferry_env(bin),
        m.ferry_env(bin),
        n1.ferry_env(bin),
        n2.ferry_env(bin),
    );
    let tls = tls_init(m, &em, "tls");
    let file = |f: &str| tls.join(f).to_str().unwrap().to_string();
    let ca = file("ca.crt");
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let _manager = manager_with(
        m,
        &em,
        &[
            "--tls-cert",
            &file("server.crt"),
            "--tls-key",
            &file("server.key"),
        ],
    );
    let plane = format!("https://{}:{LINK_PORT}", m.addr());
    let _w1 = worker_at(n1, &e1, "node-1", &plane, &["--ca", &ca]);
    let _w2 = worker_at(n2, &e2, "node-2", &plane, &["--ca", &ca]);
    let https = |args: &[&str]| {
        let mut all = vec!["--cacert", ca.as_str()];
        all.extend_from_slice(args);
        ok(m, &all)
    };
    let listed = |node: &str| -> Vec<String> {
        https(&[&format!("https://localhost:1400/nodes/{node}/instances")])
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };

    let nodes = https(&["https://localhost:1400/nodes"]);
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    let registry_addr = format!("{}:{REGISTRY_PORT}", r.addr());
    let a1 = https(&[
        "-X",
        "POST",
        &format!("https://localhost:1400/nodes/node-1/instances/{registry_addr}"),
    ]);
    let a1 = a1.as_str().unwrap().to_string();
    assert!(a1.starts_with(&n1.addr().to_string()), "{a1}");
    let name = listed("node-1")[0].clone();
    let a2 = https(&[
        "-X",
        "POST",
        &format!("https://localhost:1400/nodes/node-2/instances/{a1}"),
    ]);
    let a2 = a2.as_str().unwrap().to_string();
    assert!(a2.starts_with(&n2.addr().to_string()), "{a2}");
    assert!(listed("node-1").is_empty());
    assert_eq!(listed("node-2"), std::slice::from_ref(&name));
    // Its source tears its copy down a moment after the switch.
    wait_until(Duration::from_secs(30), "the VM to leave node-1", || {
        running_on(n1, &e1).is_empty().then_some(())
    });
    let a3 = https(&[
        "-X",
        "POST",
        &format!("https://localhost:1400/nodes/node-1/instances/{a2}"),
    ]);
    let a3 = a3.as_str().unwrap().to_string();
    assert_eq!(listed("node-1"), std::slice::from_ref(&name));
    wait_until(Duration::from_secs(30), "the VM to leave node-2", || {
        running_on(n2, &e2).is_empty().then_some(())
    });
    https(&[
        "-X",
        "DELETE",
        &format!("https://localhost:1400/nodes/node-1/instances/{a3}"),
    ]);
    assert!(listed("node-1").is_empty());
    assert!(qemu_pids(&name).is_empty(), "no QEMU left for {name}");

    // The OpenAPI document, over the same listener: every seed and /v1
    // route (the unit test in routes.rs checks it against the router).
    let doc = https(&["https://localhost:1400/openapi.json"]);
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'), "{doc}");
    for path in [
        "/nodes",
        "/nodes/{node}/instances",
        "/nodes/{node}/instances/{address}",
        "/v1/nodes",
        "/v1/nodes/{name}",
        "/v1/instances",
        "/v1/instances/{name}",
        "/v1/instances/{name}/migrate",
        "/v1/instances/{name}/suspend",
        "/v1/instances/{name}/resume",
        "/v1/events",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    discard_all(n1, &e1);
    discard_all(n2, &e2);
}

/// A plain caller (`ferry peer --from ADDR --insecure`) on `host` is
/// refused by the instance listener at `addr` with "speaks only TLS".
fn refuses_plain(host: &Host, env: &FerryEnv, addr: &str) {
    let out = host
        .ferry(env)
        .args(["peer", "--from", addr, "--insecure", "--name", "probe"])
        .args(["--token", "a-probe-token-0123456789", "--net", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("speaks only TLS"),
        "{}",
        describe(&out)
    );
    assert!(!env.vm_dir("probe").exists(), "nothing made by the probe");
}

/// Workers given TLS material (`--tls-cert`, `--tls-key`, `--client-ca`,
/// `--ca`, `--client-cert`, `--client-key`) move an instance between them
/// over mutual TLS: each instance's migration listener speaks only TLS
/// and requires a client certificate of the cluster's CA (a plain caller
/// is refused with "speaks only TLS"), and the move 1 → 2 → 1 still
/// completes, so the destination dialled its source in TLS with its
/// client certificate. The guest's Redis keeps its key across both
/// moves. Checked to fail without the feature: the worker had no
/// `--tls-cert`, and its instances served plain TCP.
#[test]
fn moves_between_tls_workers_are_mutual_tls() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "m", "n1", "n2"]);
    let (r, m, n1, n2) = (&hosts["r"], &hosts["m"], &hosts["n1"], &hosts["n2"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em, e1, e2) = (
        r.ferry_env(bin),
        m.ferry_env(bin),
        n1.ferry_env(bin),
        n2.ferry_env(bin),
    );
    // One CA for the cluster; the server certificate names every host.
    let tls = em.state.path().join("tls");
    let out = em.run(&[
        "tls",
        "init",
        tls.to_str().unwrap(),
        "--san",
        &m.addr().to_string(),
        "--san",
        &n1.addr().to_string(),
        "--san",
        &n2.addr().to_string(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let file = |f: &str| tls.join(f).to_str().unwrap().to_string();
    let ca = file("ca.crt");
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let _manager = manager_with(
        m,
        &em,
        &[
            "--tls-cert",
            &file("server.crt"),
            "--tls-key",
            &file("server.key"),
        ],
    );
    let plane = format!("https://{}:{LINK_PORT}", m.addr());
    let tls_worker = |n: &Host, env: &FerryEnv, name: &str| {
        start(
            n,
            env,
            &[
                "worker",
                "--name",
                name,
                "--host-interface",
                n.interface(),
                "--control-plane",
                &plane,
                "--lease-s",
                "3",
                "--ca",
                &ca,
                "--client-cert",
                &file("client.crt"),
                "--client-key",
                &file("client.key"),
                "--tls-cert",
                &file("server.crt"),
                "--tls-key",
                &file("server.key"),
                "--client-ca",
                &ca,
            ],
            "registered as node ",
        )
    };
    let _w1 = tls_worker(n1, &e1, "node-1");
    let _w2 = tls_worker(n2, &e2, "node-2");
    let https = |args: &[&str]| {
        let mut all = vec!["--cacert", ca.as_str()];
        all.extend_from_slice(args);
        ok(m, &all)
    };

    // Create it on node-1 with its Redis port exposed there.
    let name = "kv-tls";
    let create = cluster(
        m,
        &em,
        &[
            "--manager",
            "https://localhost:1400",
            "--ca",
            &ca,
            "create",
            &format!("{}:{REGISTRY_PORT}", r.addr()),
            "--node",
            "node-1",
            "--name",
            name,
            "--expose",
            &format!("{REDIS_PORT}:6379"),
        ],
    );
    assert!(create.status.success(), "{}", describe(&create));
    let created: Value = serde_json::from_slice(&create.stdout).unwrap();
    let a1 = created["address"].as_str().unwrap().to_string();
    assert!(a1.starts_with(&n1.addr().to_string()), "{created}");
    // Its migration listener on node-1 speaks only TLS.
    refuses_plain(n2, &e2, &a1);
    let kv = |n: &Host, args: &[&str]| {
        let at = SocketAddr::new(n.addr().into(), REDIS_PORT);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        in_netns(m.name(), move || {
            let mut c = Redis::connect(at).expect("redis answers");
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            c.send(&refs).unwrap();
            c.reply().unwrap()
        })
        .join()
        .unwrap()
    };
    assert_eq!(kv(n1, &["SET", "moved", "over-tls"]).as_deref(), Some("OK"));

    let a2 = https(&[
        "-X",
        "POST",
        &format!("https://localhost:1400/nodes/node-2/instances/{a1}"),
    ]);
    let a2 = a2.as_str().unwrap().to_string();
    assert!(a2.starts_with(&n2.addr().to_string()), "{a2}");
    assert_eq!(on_node_tls(m, &ca, "node-2"), [name]);
    wait_until(Duration::from_secs(30), "the VM to leave node-1", || {
        running_on(n1, &e1).is_empty().then_some(())
    });
    refuses_plain(n1, &e1, &a2);
    assert_eq!(kv(n2, &["GET", "moved"]).as_deref(), Some("over-tls"));

    let a3 = https(&[
        "-X",
        "POST",
        &format!("https://localhost:1400/nodes/node-1/instances/{a2}"),
    ]);
    let a3 = a3.as_str().unwrap().to_string();
    assert_eq!(on_node_tls(m, &ca, "node-1"), [name]);
    wait_until(Duration::from_secs(30), "the VM to leave node-2", || {
        running_on(n2, &e2).is_empty().then_some(())
    });
    assert_eq!(kv(n1, &["GET", "moved"]).as_deref(), Some("over-tls"));
    https(&[
        "-X",
        "DELETE",
        &format!("https://localhost:1400/nodes/node-1/instances/{a3}"),
    ]);
    assert!(qemu_pids(name).is_empty(), "no QEMU left for {name}");
    discard_all(n1, &e1);
    discard_all(n2, &e2);
}

/// The names of the instances the manager lists on `node`, over https.
fn on_node_tls(m: &Host, ca: &str, node: &str) -> Vec<String> {
    ok(
        m,
        &[
            "--cacert",
            ca,
            &format!("https://localhost:1400/nodes/{node}/instances"),
        ],
    )
    .as_array()
    .unwrap()
    .iter()
    .map(|i| i["name"].as_str().unwrap().to_string())
    .collect()
}

#[test]
fn suspend_and_resume_through_the_api_keep_the_guests_data() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "m", "n1", "client"]);
    let (r, m, n1) = (&hosts["r"], &hosts["m"], &hosts["n1"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em, e1) = (r.ferry_env(bin), m.ferry_env(bin), n1.ferry_env(bin));
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, None);
    let _manager = manager(m, &em, &[]);
    let _w1 = worker(n1, &e1, "node-1", m, &[]);
    let create = cluster(
        m,
        &em,
        &[
            "create",
            &format!("{}:{REGISTRY_PORT}", r.addr()),
            "--name",
            // Not `kv`: `qemu_pids` looks machine-wide, and benchmarks
            // on the same host run VMs named `kv` outside the VM lock.
            "kv-sr",
            "--expose",
            &format!("{REDIS_PORT}:6379"),
        ],
    );
    assert!(create.status.success(), "{}", describe(&create));
    let redis = SocketAddr::new(n1.addr().into(), REDIS_PORT);
    let client = hosts["client"].name().to_string();
    let kv = move |args: Vec<String>| {
        in_netns(&client.clone(), move || {
            let mut c = Redis::connect(redis).expect("redis answers");
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            c.send(&refs).unwrap();
            c.reply().unwrap()
        })
        .join()
        .unwrap()
    };
    assert_eq!(
        kv(vec!["SET".into(), "kept".into(), "across-suspend".into()]).as_deref(),
        Some("OK")
    );

    // A resume of a running instance is refused, and changes nothing.
    let (status, problem) = curl(
        m,
        &[
            "-X",
            "POST",
            "http://localhost:1400/v1/instances/kv-sr/resume",
        ],
    );
    assert_eq!(status, 409, "{problem}");

    let (status, suspended) = curl(
        m,
        &[
            "-X",
            "POST",
            "http://localhost:1400/v1/instances/kv-sr/suspend",
        ],
    );
    assert_eq!(status, 200, "{suspended}");
    assert_eq!(suspended["state"], "suspended", "{suspended}");
    assert!(suspended["address"].is_null(), "{suspended}");
    assert!(qemu_pids("kv-sr").is_empty(), "its QEMU is gone");
    // The next heartbeats keep it suspended.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(instance(m, &em, "kv-sr")["state"], "suspended");
    let (status, problem) = curl(
        m,
        &[
            "-X",
            "POST",
            "http://localhost:1400/v1/instances/kv-sr/suspend",
        ],
    );
    assert_eq!(status, 409, "{problem}");

    let resumed = cluster(m, &em, &["resume", "kv-sr"]);
    assert!(resumed.status.success(), "{}", describe(&resumed));
    let resumed: Value = serde_json::from_slice(&resumed.stdout).unwrap();
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert!(
        resumed["address"].as_str().is_some(),
        "it serves its next move: {resumed}"
    );
    assert!(!qemu_pids("kv-sr").is_empty());
    assert_eq!(
        kv(vec!["GET".into(), "kept".into()]).as_deref(),
        Some("across-suspend")
    );

    // `ferry shell` works in a VM a peer runs (the worker's VMs are
    // detached peers), as root, seeing the service, exit code passed on.
    let shell = n1
        .ferry(&e1)
        .args([
            "shell",
            "kv-sr",
            "--",
            "sh",
            "-c",
            "id -u; pidof redis-server >/dev/null && echo service-seen; exit 3",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(shell.status.code(), Some(3), "{}", describe(&shell));
    assert!(
        !String::from_utf8_lossy(&shell.stderr).contains("no shell channel"),
        "through the shell channel, not the agent: {}",
        describe(&shell)
    );
    assert_eq!(
        String::from_utf8_lossy(&shell.stdout).trim(),
        "0\nservice-seen",
        "{}",
        describe(&shell)
    );

    // An error in the guest reaches the control plane: its service is
    // killed on node-1; `GET /v1/events` tells a `guest-error` naming the
    // instance, `ferry cluster watch` shows it as `ferry watch` does, and
    // the instance keeps it as its `last_error`.
    let raw = follow(m.cmd("curl").args([
        "-sSN",
        "--max-time",
        "120",
        "http://localhost:1400/v1/events",
    ]));
    let human = follow(m.ferry(&em).args(["cluster", "watch"]));
    std::thread::sleep(Duration::from_millis(500));
    let killed = n1
        .ferry(&e1)
        .args([
            "exec",
            "kv-sr",
            "--",
            "sh",
            "-c",
            "kill -9 $(pidof redis-server)",
        ])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{}", describe(&killed));
    let event = raw.wait_for(
        Duration::from_secs(30),
        "guest-error event for kv-sr",
        |l| {
            let ev: Value = serde_json::from_str(l.strip_prefix("data:")?.trim()).ok()?;
            (ev["type"] == "guest-error" && ev["name"] == "kv-sr").then_some(ev)
        },
    );
    assert_eq!(event["node"], "node-1", "{event}");
    assert_eq!(event["error"]["kind"], "service-exited", "{event}");
    let what = event["error"]["what"].as_str().expect("what").to_string();
    assert!(what.contains("killed by signal 9"), "{event}");
    human.wait_for(
        Duration::from_secs(10),
        "[VM kv-sr error] line from ferry cluster watch",
        |l| (l == format!("[VM kv-sr error] {what}")).then_some(()),
    );
    let (status, shown) = curl(m, &["http://localhost:1400/v1/instances/kv-sr"]);
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["last_error"], event["error"], "{shown}");
    // Later heartbeats report the same error: it is not told again.
    std::thread::sleep(Duration::from_secs(3));
    let again = raw.lines_so_far();
    assert_eq!(
        again
            .iter()
            .filter(|l| l.contains("\"guest-error\""))
            .count(),
        1,
        "{again:?}"
    );

    let deleted = cluster(m, &em, &["delete", "kv-sr"]);
    assert!(deleted.status.success(), "{}", describe(&deleted));
    assert!(qemu_pids("kv-sr").is_empty());
    discard_all(n1, &e1);
}

/// An `https://` registry with a private CA: the manager reads package
/// descriptions and workers start VMs from it with `--registry-ca`;
/// without it, each side refuses the certificate and nothing runs.
#[test]
fn an_https_registry_is_read_with_registry_ca() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "m", "n1"]);
    let (r, m, n1) = (&hosts["r"], &hosts["m"], &hosts["n1"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, em, e1) = (r.ferry_env(bin), m.ferry_env(bin), n1.ferry_env(bin));
    let tls = tls_init(r, &er, "tls");
    let ca = tls.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let listen = format!("0.0.0.0:{REGISTRY_PORT}");
    let _registry = start(
        r,
        &er,
        &[
            "registry",
            "--package",
            pkg.to_str().unwrap(),
            "--listen",
            &listen,
            "--tls-cert",
            tls.join("server.crt").to_str().unwrap(),
            "--tls-key",
            tls.join("server.key").to_str().unwrap(),
        ],
        "listening on ",
    );
    let source = format!("https://{}:{REGISTRY_PORT}/", r.addr());
    let create = |name: &str| {
        let body = serde_json::json!({"source": source, "node": "node-1", "name": name});
        curl(
            m,
            &[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
                "http://localhost:1400/v1/instances",
            ],
        )
    };

    // The manager without --registry-ca cannot read the registry.
    let mut mgr = manager(m, &em, &[]);
    let w = worker(n1, &e1, "node-1", m, &[]);
    let (status, problem) = create("kv1");
    assert_eq!(status, 400, "{problem}");
    let detail = problem["detail"].as_str().unwrap().to_lowercase();
    assert!(
        detail.contains("certificate") || detail.contains("tls"),
        "{problem}"
    );
    mgr.kill().unwrap();
    let _ = mgr.wait();

    // With it, the manager reads it; the worker without it cannot.
    let _mgr = manager(m, &em, &["--registry-ca", ca]);
    wait_until(Duration::from_secs(30), "node-1 to register again", || {
        (status_of(m, "http://localhost:1400/v1/nodes/node-1") == Some(200)).then_some(())
    });
    let (status, problem) = create("kv2");
    assert!(status >= 400, "{status} {problem}");
    let detail = problem["detail"].as_str().unwrap().to_lowercase();
    assert!(
        detail.contains("certificate") || detail.contains("tls"),
        "{problem}"
    );
    assert!(running_on(n1, &e1).is_empty());
    drop(w);

    // The worker with it: the VM runs from the https registry.
    let _w = worker(n1, &e1, "node-1", m, &["--registry-ca", ca]);
    let (status, inst) = create("kv3");
    assert_eq!(status, 201, "{inst}");
    assert_eq!(inst["state"], "running", "{inst}");
    assert_eq!(inst["source"], source.as_str(), "{inst}");
    assert_eq!(running_on(n1, &e1), ["kv3"]);
    for name in ["kv2", "kv3"] {
        let _ = curl(
            m,
            &[
                "-X",
                "DELETE",
                &format!("http://localhost:1400/v1/instances/{name}"),
            ],
        );
    }
    assert!(running_on(n1, &e1).is_empty());
    discard_all(n1, &e1);
}
