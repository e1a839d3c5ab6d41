//! Networking with real QEMU guests: `--expose` into the VM's namespace and
//! across suspend/resume, a guest reaching another VM's exposed port at its
//! own gateway, and bad input that leaves no namespace, link or rule behind.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Output;
use std::time::Duration;

use ferry_test_support::{describe, qemu_pids, spawn_until_live, vm_lock};

mod common;
use common::{copy_of_package, env, error_line, exec, stop, tiny_package};

/// What networking looks like from the host: namespaces, interface names
/// and the ruleset (without packet counters).
#[derive(Debug, PartialEq, Eq)]
struct NetSnapshot {
    netns: Vec<String>,
    links: Vec<String>,
    rules: Vec<String>,
}

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn snapshot() -> NetSnapshot {
    let mut netns: Vec<String> = sh("ip netns list")
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    netns.sort();
    let mut links: Vec<String> = sh("ip -o link")
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .collect();
    links.sort();
    let rules = sh("iptables-save")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect();
    NetSnapshot {
        netns,
        links,
        rules,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:port; the body.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or(text))
}

fn run_args<'a>(pkg: &'a str, name: &'a str, expose: &'a str) -> Vec<&'a str> {
    vec!["run", "--package", pkg, "--name", name, "--expose", expose]
}

#[test]
fn expose_reaches_the_guest_and_survives_suspend_and_resume() {
    let _lock = vm_lock();
    let env = env();
    let before = snapshot();
    let pkg = copy_of_package(&env, "e.ferry");
    let pkg = pkg.to_str().unwrap();
    let port = free_port();
    let expose = format!("127.0.0.1:{port}:8080");

    let (mut run, lines) = spawn_until_live(
        &env,
        &run_args(pkg, "e1", &expose),
        Duration::from_secs(120),
    );
    assert!(
        lines
            .iter()
            .any(|l| l
                == &format!("network: namespace ferry-e1; 127.0.0.1:{port} -> guest port 8080")),
        "{lines:?}"
    );
    assert_eq!(
        http_get(port, "/").unwrap(),
        "hello from a ferry tiny guest"
    );
    exec(&env, "e1", "echo persisted > /srv/www/state.txt; sync");
    let out = stop(&mut run);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens while the VM is suspended"
    );
    assert_eq!(snapshot(), before, "suspend removed the VM's network");

    // Resumed (here into a namespace of another name), the same exposure
    // reaches the same guest, its state intact.
    let (mut run, _) = spawn_until_live(
        &env,
        &[
            "run",
            "--package",
            pkg,
            "--name",
            "e1",
            "--netns",
            "ferry-test-moved",
            "--expose",
            &expose,
        ],
        Duration::from_secs(120),
    );
    assert_eq!(http_get(port, "/state.txt").unwrap(), "persisted");
    let out = stop(&mut run);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(snapshot(), before);
}

#[test]
fn a_guest_reaches_another_vms_exposed_port_at_its_gateway() {
    let _lock = vm_lock();
    let env = env();
    let before = snapshot();
    let pkg = tiny_package(&env);
    let pkg = pkg.to_str().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let e1 = format!("{p1}:8080");
    let e2 = format!("0.0.0.0:{p2}:8080");
    let clone = |name, expose| {
        let mut a = run_args(pkg, name, expose);
        a.push("--clone");
        spawn_until_live(&env, &a, Duration::from_secs(120)).0
    };
    let mut c1 = clone("c1", &e1);
    let mut c2 = clone("c2", &e2);
    exec(&env, "c1", "echo i-am-c1 > /srv/www/who.txt");
    exec(&env, "c2", "echo i-am-c2 > /srv/www/who.txt");

    let get = |from: &str, port: u16| {
        exec(
            &env,
            from,
            &format!(
                "printf 'GET /who.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 10 172.100.100.1 {port} | tail -n 1"
            ),
        )
    };
    assert_eq!(get("c2", p1), "i-am-c1", "c2 reaches c1 at its gateway");
    assert_eq!(get("c1", p2), "i-am-c2", "c1 reaches c2 (bound to 0.0.0.0)");
    assert_eq!(get("c1", p1), "i-am-c1", "a guest reaches its own exposure");
    // A port nobody exposes is refused, not hung.
    let closed = free_port();
    let out = env.run(&[
        "exec",
        "c1",
        "--",
        "sh",
        "-c",
        &format!("printf x | nc -w 10 172.100.100.1 {closed}; echo done"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));

    for c in [&mut c1, &mut c2] {
        let out = stop(c);
        assert!(out.status.success(), "{}", describe(&out));
    }
    assert_eq!(snapshot(), before);
}

fn fails(out: &Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", describe(out));
    let line = error_line(out);
    assert!(line.contains(needle), "{line}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("ferry: ")).count(),
        1,
        "one error line: {stderr}"
    );
}

#[test]
fn bad_network_input_is_refused_and_leaves_nothing_behind() {
    let _lock = vm_lock();
    let env = env();
    let before = snapshot();
    let pkg = tiny_package(&env);
    let pkg = pkg.to_str().unwrap();

    // A host port in use: refused before the VM starts.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = env.run(&[
        "run",
        "--package",
        pkg,
        "--clone",
        "--name",
        "busy",
        "--expose",
        &format!("{port}:8080"),
    ]);
    fails(&out, 3, &format!("127.0.0.1:{port} is already in use"));
    assert!(qemu_pids("busy").is_empty());
    assert!(!env.vm_dir("busy").exists());
    assert_eq!(snapshot(), before);

    // Spelling mistakes.
    for (args, needle) in [
        (
            vec!["--expose", "16379"],
            "use [HOSTADDR:]HOSTPORT:GUESTPORT",
        ),
        (
            vec!["--expose", "1:2", "--expose", "1:3"],
            "host port 1 is given twice",
        ),
        (
            vec!["--net", "none", "--expose", "1:2"],
            "--net none gives the VM no network",
        ),
        (vec!["--netns", "a/b"], "invalid network namespace name"),
    ] {
        let mut a = vec!["run", "--package", pkg, "--clone", "--name", "typo"];
        a.extend(args);
        fails(&env.run(&a), 3, needle);
    }
    assert_eq!(snapshot(), before);

    // A namespace another VM uses.
    let (mut first, _) = spawn_until_live(
        &env,
        &[
            "run",
            "--package",
            pkg,
            "--clone",
            "--name",
            "owner",
            "--netns",
            "ferry-test-shared",
            "--expose",
            &format!("{}:8080", free_port()),
        ],
        Duration::from_secs(120),
    );
    let out = env.run(&[
        "run",
        "--package",
        pkg,
        "--clone",
        "--name",
        "intruder",
        "--netns",
        "ferry-test-shared",
    ]);
    fails(
        &out,
        3,
        "network namespace 'ferry-test-shared' is in use by VM 'owner'",
    );
    assert!(qemu_pids("intruder").is_empty());
    assert_eq!(
        exec(&env, "owner", "wget -qO- http://127.0.0.1:8080/"),
        "hello from a ferry tiny guest",
        "the first VM is untouched"
    );
    let out = stop(&mut first);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(snapshot(), before);

    // `net up` with an interface that does not exist.
    let out = env.run(&["net", "up", "--host-interface", "nope0", "--prefix", "fbad"]);
    fails(&out, 3, "host interface 'nope0' does not exist");
    let out = env.run(&["net", "up", "--host-interface", "lo", "--prefix", "Bad!"]);
    fails(&out, 3, "invalid --prefix");
    assert_eq!(snapshot(), before);

    // Without root: one line that says so, and what to do.
    let nobody_state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        nobody_state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env("FERRY_STATE", nobody_state.path().join("state"))
            .env("FERRY_CACHE", nobody_state.path().join("cache"));
        cmd.output().unwrap()
    };
    fails(
        &as_nobody(&["net", "up", "--host-interface", "lo", "--prefix", "fnr"]),
        4,
        "ferry needs root",
    );
    let copy = nobody_state.path().join("t.ferry");
    std::fs::copy(pkg, &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = as_nobody(&[
        "run",
        "--package",
        copy.to_str().unwrap(),
        "--clone",
        "--accel",
        "tcg",
        "--name",
        "nr",
    ]);
    fails(&out, 4, "or pass --net none for a VM without a network");
    assert_eq!(snapshot(), before);
}
