//! Fleets with real QEMU guests: `ferry up` of the `web` package, the
//! members finding each other by name, `ps`, `stop`, `start`, `logs`,
//! `clean`; a member that crashes while the others run, a supervisor
//! killed as in a host crash, and bad input refused before anything starts.
//!
//! What a test leaves behind is checked for its own VMs (their namespaces
//! and host links, `vm_leftovers`), not by comparing the whole host's
//! networking: other users of a shared test host start and stop VMs of
//! their own meanwhile.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Output;
use std::time::Duration;

use ferry_test_support::netsnap::vm_leftovers;
use ferry_test_support::ports::retry_on_port_clash;
use ferry_test_support::{describe, qemu_pids, send_signal, vm_lock, wait_until, FerryEnv};
use serde_json::Value;

mod common;
use common::{env, error_line, recipe_package};

/// Stops and discards every VM of the environment when the test ends, so
/// that a failing test leaves no detached VM running.
struct Fleet<'a>(&'a FerryEnv);

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", "--all", "--discard"]);
        let _ = self.0.run(&["clean"]);
    }
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", describe(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output, code: i32, needle: &str) -> String {
    assert_eq!(out.status.code(), Some(code), "{}", describe(out));
    let line = error_line(out);
    assert!(line.contains(needle), "{line}");
    line
}

/// One HTTP request to 127.0.0.1:port; the status and body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: fleet\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    s.write_all(&request)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP answer"))?;
    let status = String::from_utf8_lossy(&answer[..end])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, answer[end + 4..].to_vec()))
}

fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = http(port, "GET", path, b"").unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn ps_json(env: &FerryEnv) -> Vec<Value> {
    let text = ok(&env.run(&["ps", "--json"]));
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn vm_dirs(env: &FerryEnv) -> Vec<String> {
    std::fs::read_dir(env.state.path().join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to 30 s for `ps` to show VM `name` in `state`; panics with
/// what `ps`, the VM's logs and `cause` (the command that was to bring it
/// there) say if it does not.
fn wait_state(env: &FerryEnv, name: &str, state: &str, cause: &Output) {
    if wait_for_state(env, name, state, Duration::from_secs(30)) {
        return;
    }
    let ps = env.run(&["ps"]);
    let log = env.run(&["logs", name, "--supervisor"]);
    let console = env.run(&["logs", name]);
    panic!(
        "{name} is not {state} after 30 s\nafter: {}\nps: {}\nsupervisor log: {}\nconsole: {}",
        describe(cause),
        describe(&ps),
        describe(&log),
        describe(&console)
    );
}

/// Whether `ps` shows VM `name` in `state` within `timeout`.
fn wait_for_state(env: &FerryEnv, name: &str, state: &str, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if ps_json(env)
            .iter()
            .any(|r| r["name"] == name && r["state"] == state)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The members `/cluster-status` on `port` lists, reachable or not.
fn cluster(port: u16) -> Vec<(String, bool)> {
    let status = get_json(port, "/cluster-status");
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["reachable"] == Value::Bool(true),
            )
        })
        .collect()
}

#[test]
fn a_fleet_comes_up_finds_itself_by_name_suspends_resumes_and_leaves_nothing() {
    let _lock = vm_lock();
    let env = env();
    let pkg = recipe_package(&env, "web");
    let _fleet = Fleet(&env);
    let names = ["web-0", "web-1", "web-2"];

    let (out, base) = retry_on_port_clash(3, |base| {
        let out = env.run(&[
            "up",
            "--package",
            pkg.to_str().unwrap(),
            "-n",
            "3",
            "--name-prefix",
            "web",
            "--expose-base",
            &base.to_string(),
        ]);
        match out.status.success() {
            true => Ok((out, base)),
            false => Err(describe(&out)),
        }
    });
    let text = ok(&out);
    for (i, name) in names.iter().enumerate() {
        assert!(
            text.contains(&format!("{name}: live in ")),
            "{}",
            describe(&out)
        );
        assert!(text.contains(&format!("127.0.0.1:{} -> 8000", base + i as u16)));
    }

    // ps: three running, with exactly the documented keys.
    let rows = ps_json(&env);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let keys: BTreeSet<&str> = [
        "name",
        "state",
        "pid",
        "engine_pid",
        "cgroup",
        "accel",
        "uptime_s",
        "memory_mib",
        "unique_memory_mib",
        "exposes",
        "last_error",
    ]
    .into();
    for (i, row) in rows.iter().enumerate() {
        let got: BTreeSet<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(got, keys, "{row}");
        assert_eq!(row["name"], names[i]);
        assert_eq!(row["state"], "running");
        assert!(row["pid"].as_u64().is_some(), "{row}");
        assert!(
            ["tcg", "kvm"].contains(&row["accel"].as_str().unwrap()),
            "{row}"
        );
        assert!(row["uptime_s"].as_u64().is_some(), "{row}");
        assert_eq!(row["memory_mib"], 256);
        // Clones share the package's memory: each has far less of its own.
        let unique = row["unique_memory_mib"].as_u64().unwrap();
        assert!(unique > 0 && unique < 256, "{row}");
        assert_eq!(
            row["exposes"],
            serde_json::json!([{"host": format!("127.0.0.1:{}", base + i as u16), "guest": 8000}])
        );
    }
    let table = ok(&env.run(&["ps"]));
    assert!(table.starts_with("NAME "), "{table}");
    assert_eq!(table.matches(" running ").count(), 3, "{table}");

    // Each answers, under its own name.
    for (i, name) in names.iter().enumerate() {
        let health = get_json(base + i as u16, "/health");
        assert_eq!(health["name"], *name, "{health}");
    }
    // The cluster as one member sees it, and a guest's fleet file.
    let everyone: Vec<(String, bool)> = names.iter().map(|n| (n.to_string(), true)).collect();
    wait_until(
        Duration::from_secs(20),
        "all three in web-0's cluster",
        || (cluster(base) == everyone).then_some(()),
    );
    let fleet_file = ok(&env.run(&["exec", "web-1", "--", "cat", "/run/ferry/fleet.json"]));
    let fleet_file: Value = serde_json::from_str(&fleet_file).unwrap();
    assert_eq!(fleet_file["self"], "web-1");
    assert_eq!(
        fleet_file["members"]["web-2"],
        format!("172.100.100.1:{}", base + 2)
    );

    let (status, body) = http(base + 1, "POST", "/storage/greeting", b"kept across stop").unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));

    // `logs -f` prints the console so far, then follows it until the VM
    // stops: a line the guest writes to its console before `logs -f`
    // starts and one written after both show up.
    let to_console = |line: &str| {
        ok(&env.run(&[
            "exec",
            "web-2",
            "--",
            "sh",
            "-c",
            &format!("echo {line} > /dev/console"),
        ]))
    };
    to_console("ferry-test-before-follow");
    let mut follow = env
        .cmd()
        .args(["logs", "-f", "web-2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let followed = {
        let mut out = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        })
    };
    // Give `logs -f` time to print what is there and start following.
    std::thread::sleep(Duration::from_millis(500));
    to_console("ferry-test-while-following");

    // Suspended: state kept, nothing running.
    let text = ok(&env.run(&["stop", "--all"]));
    assert_eq!(text.matches(": suspended in ").count(), 3, "{text}");
    assert!(ps_json(&env).iter().all(|r| r["state"] == "suspended"));
    for name in names {
        assert!(qemu_pids(name).is_empty(), "{name} still has a QEMU");
    }
    assert!(TcpStream::connect(("127.0.0.1", base)).is_err());
    let status = wait_until(Duration::from_secs(10), "logs -f to end", || {
        follow.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    let followed = followed.join().unwrap();
    let before = followed.find("ferry-test-before-follow");
    let during = followed.find("ferry-test-while-following");
    assert!(
        before.is_some() && during.is_some() && before < during,
        "logs -f printed: {followed}"
    );

    // Resumed with its data and its port.
    let text = ok(&env.run(&["start", "web-1"]));
    assert!(text.starts_with("web-1: live in "), "{text}");
    assert_eq!(get_json(base + 1, "/health")["name"], "web-1");
    assert_eq!(
        http(base + 1, "GET", "/storage/greeting", b"").unwrap(),
        (200, b"kept across stop".to_vec())
    );
    let states: Vec<(String, String)> = ps_json(&env)
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().into(),
                r["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("web-0".into(), "suspended".into()),
            ("web-1".into(), "running".into()),
            ("web-2".into(), "suspended".into())
        ]
    );
    // Restarted (suspended and resumed again, now from its own package):
    // the data is still there.
    let text = ok(&env.run(&["restart", "web-1"]));
    assert!(text.starts_with("web-1: live in "), "{text}");
    assert_eq!(
        http(base + 1, "GET", "/storage/greeting", b"").unwrap(),
        (200, b"kept across stop".to_vec())
    );
    // rm: not while it runs; a suspended one's state goes.
    fails(&env.run(&["rm", "web-1"]), 3, "'web-1' is running");
    assert_eq!(
        ok(&env.run(&["rm", "web-0"])).trim(),
        "removed web-0 (suspended)"
    );
    assert!(!env.vm_dir("web-0").exists());

    // Discarded, cleaned: nothing left.
    let text = ok(&env.run(&["stop", "--all", "--discard"]));
    assert_eq!(text.lines().count(), 2, "{text}");
    ok(&env.run(&["clean"]));
    assert_eq!(vm_dirs(&env), Vec::<String>::new());
    assert_eq!(ps_json(&env), Vec::<Value>::new());
    for name in names {
        assert!(qemu_pids(name).is_empty(), "{name} still has a QEMU");
    }
    assert_eq!(vm_leftovers(&names), Vec::<String>::new());
}

#[test]
fn a_member_that_crashes_shows_in_ps_while_the_rest_run_and_clean_handles_a_host_crash() {
    let _lock = vm_lock();
    let env = env();
    let pkg = recipe_package(&env, "web");
    let pkg = pkg.to_str().unwrap();
    let _fleet = Fleet(&env);
    let ours = ["c-0", "c-1", "c-2", "solo"];

    let text = ok(&env.run(&["up", "--package", pkg, "-n", "2", "--name-prefix", "c"]));
    assert!(text.contains("fleet 'c': 2 VMs running"), "{text}");
    let rows = ps_json(&env);
    let port = |i: usize| -> u16 {
        rows[i]["exposes"][0]["host"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (p0, p1) = (port(0), port(1));
    assert_eq!(get_json(p1, "/health")["name"], "c-1");
    // A detached VM of its own is no member of the fleet.
    let text = ok(&env.run(&[
        "run",
        "--package",
        pkg,
        "--clone",
        "--detach",
        "--name",
        "solo",
    ]));
    assert!(text.starts_with("solo: live in "), "{text}");
    std::thread::sleep(Duration::from_millis(1500)); // three fleet-watch ticks
    let members: Vec<String> = cluster(p0).into_iter().map(|(n, _)| n).collect();
    assert_eq!(members, vec!["c-0", "c-1"]);
    let text = ok(&env.run(&["stop", "solo", "--discard"]));
    assert!(text.starts_with("solo: discarded in "), "{text}");

    // Names in use: refused before anything starts.
    let out = env.run(&["up", "--package", pkg, "-n", "3", "--name-prefix", "c"]);
    fails(&out, 3, "'c-0' (running), 'c-1' (running) are taken");
    let out = env.run(&[
        "run",
        "--package",
        pkg,
        "--clone",
        "--detach",
        "--name",
        "c-1",
    ]);
    fails(&out, 3, "'c-1' is in use");
    assert_eq!(ps_json(&env).len(), 2);
    assert!(qemu_pids("c-2").is_empty());

    // c-1's kernel panics; c-0 runs on, and its fleet shrinks to itself.
    // With panic=-1 and QEMU's -no-reboot a panic normally ends QEMU at
    // once; under TCG the guest's reboot path has been seen to spin instead
    // (QEMU running on, its translation cache growing). Then QEMU is killed:
    // for ferry it is the same event, the engine gone under a running VM.
    let crash = env.run(&[
        "exec",
        "c-1",
        "--timeout",
        "10",
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    if !wait_for_state(&env, "c-1", "crashed", Duration::from_secs(10)) {
        for pid in qemu_pids("c-1") {
            send_signal(pid, libc::SIGKILL);
        }
    }
    wait_state(&env, "c-1", "crashed", &crash);
    let table = ok(&env.run(&["ps"]));
    assert!(table.contains("c-0   running"), "{table}");
    assert!(table.contains("c-1   crashed"), "{table}");
    assert!(table.contains("the VM stopped unexpectedly: "), "{table}");
    assert!(
        table.contains("| [") && table.contains("Kernel panic"),
        "{table}"
    );
    let logs = ok(&env.run(&["logs", "c-1"]));
    assert!(logs.contains("Kernel panic"), "{logs}");
    assert!(qemu_pids("c-1").is_empty());
    assert_eq!(get_json(p0, "/health")["name"], "c-0");
    wait_until(Duration::from_secs(20), "c-0's fleet to lose c-1", || {
        (cluster(p0) == vec![("c-0".to_string(), true)]).then_some(())
    });
    assert!(TcpStream::connect(("127.0.0.1", p1)).is_err());
    // Stopping a crashed VM says so and changes nothing.
    let text = ok(&env.run(&["stop", "c-1"]));
    assert!(text.contains("c-1: crashed, nothing to stop"), "{text}");

    // A host crash: supervisor and QEMU killed at once, nothing cleaned up.
    let supervisor = ps_json(&env)[0]["pid"].as_u64().unwrap() as u32;
    let mut killed = qemu_pids("c-0");
    killed.push(supervisor);
    for pid in killed {
        send_signal(pid, libc::SIGKILL);
    }
    let none = env.run(&["ps"]);
    wait_state(&env, "c-0", "crashed", &none);
    let table = ok(&env.run(&["ps"]));
    assert!(
        table.contains(&format!("its supervisor (pid {supervisor}) is gone")),
        "{table}"
    );
    assert_eq!(
        vm_leftovers(&ours).len(),
        2,
        "the killed VM's namespace and link are still there"
    );

    let text = ok(&env.run(&["clean"]));
    assert!(
        text.contains("c-0: removed (crashed: its supervisor"),
        "{text}"
    );
    assert!(
        text.contains("c-1: removed (crashed: the VM stopped"),
        "{text}"
    );
    assert_eq!(vm_dirs(&env), Vec::<String>::new());
    assert_eq!(vm_leftovers(&ours), Vec::<String>::new());
    assert_eq!(ok(&env.run(&["clean"])).trim(), "nothing to clean");
}

#[test]
fn bad_input_is_refused_before_anything_starts_and_no_half_fleet_is_left() {
    let _lock = vm_lock();
    let env = env();
    let pkg = recipe_package(&env, "web");
    let pkg = pkg.to_str().unwrap();
    let _fleet = Fleet(&env);

    // More clones than memory holds: how many would fit.
    let out = env.run(&["up", "--package", pkg, "-n", "100000"]);
    let line = fails(&out, 3, "100000 clones do not fit");
    let fit: u64 = line
        .split("at most ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(fit < 100_000, "{line}");
    assert!(line.contains("each may use up to 320 MiB"), "{line}");

    fails(
        &env.run(&["up", "--package", pkg, "-n", "0"]),
        3,
        "-n 0 starts nothing",
    );
    fails(
        &env.run(&["up", "--package", pkg, "-n", "3", "--expose-base", "65535"]),
        3,
        "--expose-base 65535 with -n 3 needs ports 65535-65537",
    );
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    fails(
        &env.run(&["up", "--package", pkg, "-n", "1", "--expose-base", &port]),
        3,
        &format!("port 127.0.0.1:{port} (for web-0) is in use"),
    );
    fails(
        &env.run(&["up", "--package", pkg, "-n", "1", "--name-prefix", "Web"]),
        3,
        "--name-prefix 'Web' makes the VM name 'Web-0'",
    );
    fails(
        &env.run(&["up", "--package", "/nonexistent.ferry", "-n", "1"]),
        3,
        "/nonexistent.ferry",
    );

    // Unknown names.
    for args in [
        vec!["stop", "nope"],
        vec!["stop", "nope", "--discard"],
        vec!["start", "nope"],
        vec!["restart", "nope"],
        vec!["rm", "nope"],
        vec!["logs", "nope"],
    ] {
        fails(&env.run(&args), 3, "no VM is named 'nope'");
    }
    let out = env.run(&["stop"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_eq!(ok(&env.run(&["stop", "--all"])).trim(), "no VMs");
    assert_eq!(ps_json(&env), Vec::<Value>::new());
    assert_eq!(vm_dirs(&env), Vec::<String>::new());
    assert!(qemu_pids("web-0").is_empty());

    // One clone cannot start (another process holds its namespace): the
    // two that did are discarded, and the error says which failed and why.
    std::fs::create_dir_all("/run/ferry/netns").unwrap();
    let held = std::fs::File::create("/run/ferry/netns/ferry-half-1.lock").unwrap();
    // SAFETY: flock on a descriptor `held` owns, released when it closes.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) };
    assert_eq!(rc, 0);
    let out = env.run(&["up", "--package", pkg, "-n", "3", "--name-prefix", "half"]);
    let line = fails(
        &out,
        3,
        "1 of 3 clones did not start and nothing of fleet 'half' is left running: half-1: network namespace 'ferry-half-1' is in use",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("half-0: discarded in "), "{text} {line}");
    assert!(text.contains("half-2: discarded in "), "{text}");
    drop(held);
    let _ = std::fs::remove_file("/run/ferry/netns/ferry-half-1.lock");
    assert_eq!(vm_dirs(&env), Vec::<String>::new());
    for name in ["half-0", "half-1", "half-2"] {
        assert!(qemu_pids(name).is_empty(), "{name}");
    }
    assert_eq!(
        vm_leftovers(&["web-0", "half-0", "half-1", "half-2"]),
        Vec::<String>::new()
    );
}
