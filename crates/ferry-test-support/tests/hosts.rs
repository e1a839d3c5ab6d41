//! Test hosts: network namespaces that stand in for machines. Needs root.
//!
//! The tests compare the machine's namespaces and root links before and
//! after, so they take turns (one lock); another program creating
//! namespaces at the same time would make them fail.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use ferry_test_support::{describe, hosts, TestHosts};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_names() -> BTreeSet<String> {
    stdout_of(Command::new("ip").args(["netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn root_links() -> BTreeSet<String> {
    stdout_of(Command::new("ip").args(["-o", "link", "show"]))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether `pid` is gone (or a zombie no one reaped yet).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn three_hosts_reach_each_other_and_leave_nothing_behind() {
    let _turn = serial();
    hosts::remove_leftovers();
    let (ns_before, links_before) = (netns_names(), root_links());
    {
        let hosts = TestHosts::create(&["a", "b", "c"]);
        assert_eq!(
            root_links(),
            links_before,
            "test hosts added links to the root namespace"
        );
        let added: BTreeSet<String> = netns_names().difference(&ns_before).cloned().collect();
        let mut expected: BTreeSet<String> = hosts.iter().map(|h| h.name().to_string()).collect();
        expected.insert(hosts.switch_netns());
        assert_eq!(added, expected);

        let (net, len) = hosts.subnet();
        assert_eq!(len, 24);
        let addrs: BTreeSet<_> = hosts.iter().map(|h| h.addr()).collect();
        assert_eq!(addrs.len(), 3, "addresses are distinct: {addrs:?}");
        for h in &hosts {
            assert_eq!(h.interface(), "eth0");
            assert_eq!(
                h.addr().octets()[..3],
                net.octets()[..3],
                "{} on {net}/24",
                h.addr()
            );
            assert_eq!(
                stdout_of(h.cmd("ls").arg("/sys/class/net"))
                    .split_whitespace()
                    .collect::<Vec<_>>(),
                ["eth0", "lo"],
                "{} has lo and eth0 only",
                h.label()
            );
            let shown = stdout_of(
                h.cmd("ip")
                    .args(["-4", "-o", "addr", "show", "dev", "eth0"]),
            );
            assert!(shown.contains(&format!("inet {}/24", h.addr())), "{shown}");
            assert_eq!(
                stdout_of(h.cmd("cat").arg("/proc/sys/net/ipv4/ip_forward")).trim(),
                "1",
                "ip_forward in {}",
                h.label()
            );
        }
        for from in &hosts {
            for to in &hosts {
                if from.name() == to.name() {
                    continue;
                }
                let out = from
                    .cmd("busybox")
                    .args(["ping", "-c1", "-W2", &to.addr().to_string()])
                    .output()
                    .expect("run busybox ping (apt-get install busybox-static)");
                assert!(
                    out.status.success(),
                    "{} cannot ping {} ({}): {}",
                    from.label(),
                    to.label(),
                    to.addr(),
                    describe(&out)
                );
            }
        }
        // ...and a ping that cannot be answered fails, so the above means something.
        let nobody = std::net::Ipv4Addr::new(net.octets()[0], net.octets()[1], net.octets()[2], 99);
        let out = hosts["a"]
            .cmd("busybox")
            .args(["ping", "-c1", "-W1", &nobody.to_string()])
            .output()
            .expect("run busybox ping");
        assert!(
            !out.status.success(),
            "ping {nobody} answered: {}",
            describe(&out)
        );
    }
    assert_eq!(netns_names(), ns_before, "namespaces left behind");
    assert_eq!(root_links(), links_before, "root links changed");
}

#[test]
fn concurrent_runs_get_their_own_names_and_subnets() {
    let _turn = serial();
    let one = TestHosts::create(&["a"]);
    let two = TestHosts::create(&["a"]);
    assert_ne!(one["a"].name(), two["a"].name());
    assert_ne!(one.subnet(), two.subnet());
    assert_ne!(one.switch_netns(), two.switch_netns());
}

#[test]
fn drop_after_a_panic_removes_the_hosts_and_what_runs_in_them() {
    use std::os::unix::process::ExitStatusExt;
    let _turn = serial();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let hosts = TestHosts::create(&["x"]);
        let sleeper = hosts["x"]
            .cmd("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        // What ferry would leave behind if it died: a VM namespace named
        // after the host (FERRY_NET_PREFIX), with a process in it.
        let vm_ns = format!("{}-vm", hosts["x"].name());
        stdout_of(Command::new("ip").args(["netns", "add", &vm_ns]));
        let vm = Command::new("ip")
            .args(["netns", "exec", &vm_ns, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let names = (hosts["x"].name().to_string(), hosts.switch_netns(), vm_ns);
        tx.send((names, [sleeper, vm])).unwrap();
        panic!("a test fails while its hosts exist");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let ((ns, switch, vm_ns), children) = rx.recv().unwrap();
    let names = netns_names();
    for gone in [&ns, &switch, &vm_ns] {
        assert!(!names.contains(gone), "{gone} was removed: {names:?}");
    }
    for mut child in children {
        let status = child.try_wait().expect("wait");
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "the processes in the host and in the VM namespace were killed"
        );
    }
}

#[test]
fn ferry_runs_inside_a_host_with_its_own_state() {
    let _turn = serial();
    let hosts = TestHosts::create(&["a", "b"]);
    let (a, b) = (&hosts["a"], &hosts["b"]);
    // A stand-in for the ferry binary that shows where it runs.
    let env = a.ferry_env("/bin/sh");
    assert_ne!(env.state.path(), b.ferry_env("/bin/sh").state.path());
    let out = stdout_of(a.ferry(&env).args([
        "-c",
        "echo \"$FERRY_STATE\"; echo \"$FERRY_NET_PREFIX\"; ip -4 -o addr show dev eth0",
    ]));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(env.state.path().to_str().unwrap()));
    assert_eq!(
        lines.next(),
        Some(a.name()),
        "FERRY_NET_PREFIX is the host's name"
    );
    assert!(
        lines
            .next()
            .unwrap_or("")
            .contains(&format!("inet {}/24", a.addr())),
        "{out}"
    );
}

/// Run as a child process by `leftovers_of_a_crashed_run_are_removed`:
/// makes a host with a process in it and exits without cleaning up.
#[test]
#[ignore = "a helper that another test runs in a child process"]
fn crashed_run_helper() {
    if std::env::var_os("FERRY_TEST_HOSTS_CRASH").is_none() {
        return;
    }
    let hosts = TestHosts::create(&["crash"]);
    let sleeper = hosts["crash"]
        .cmd("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    println!(
        "LEFTOVER {} {} {}",
        hosts["crash"].name(),
        hosts.switch_netns(),
        sleeper.id()
    );
    // No destructors: as if the test process had been killed.
    std::process::exit(3);
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() {
    let _turn = serial();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["crashed_run_helper", "--exact", "--ignored", "--nocapture"])
        .env("FERRY_TEST_HOSTS_CRASH", "1")
        .output()
        .expect("run the helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LEFTOVER "))
        .unwrap_or_else(|| panic!("the helper printed no LEFTOVER line: {}", describe(&out)));
    let [ns, switch, pid]: [&str; 3] = line
        .split_whitespace()
        .collect::<Vec<_>>()
        .try_into()
        .expect("three fields");
    let pid: u32 = pid.parse().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let names = netns_names();
    assert!(
        names.contains(ns) && names.contains(switch),
        "the crash left {ns}: {names:?}"
    );
    assert!(!is_gone(pid), "the crash left its process {pid} running");

    hosts::remove_leftovers();
    let names = netns_names();
    assert!(!names.contains(ns) && !names.contains(switch), "{names:?}");
    ferry_test_support::wait_until(
        std::time::Duration::from_secs(5),
        "the leftover process to die",
        || is_gone(pid).then_some(()),
    );
}
