//! The confined engine (`docs/security.md`, "Confined engine"): every QEMU
//! ferry starts runs with QEMU's seccomp sandbox, as an unprivileged user,
//! in a cgroup of its own under ferry's, with a memory limit that kills it
//! (and only it) when crossed, and says so.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{env, status_field, tiny_package};
use ferry_test_support::{blueprint, describe, qemu_pids, spawn_until_live, vm_lock, wait_until};
use serde_json::Value;

fn ps_json(env: &ferry_test_support::FerryEnv) -> Vec<Value> {
    let out = env.run(&["ps", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn row(env: &ferry_test_support::FerryEnv, name: &str) -> Value {
    ps_json(env)
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} in ps --json"))
}

fn v1() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Checks that VM `name`'s QEMU is confined, and returns its cgroup.
fn assert_confined(env: &ferry_test_support::FerryEnv, name: &str, memory_mib: u64) -> PathBuf {
    let r = row(env, name);
    let pid = r["engine_pid"].as_u64().expect("engine_pid") as u32;
    assert_eq!(qemu_pids(name), vec![pid], "ps names the QEMU of {name}");
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "{name}: seccomp filter on"
    );
    let cgroup = PathBuf::from(r["cgroup"].as_str().expect("a cgroup in ps --json"));
    let parent = ferry_test_support::own_memory_cgroup();
    assert_eq!(
        cgroup.parent(),
        Some(parent.as_path()),
        "{name}: its cgroup is a child of ferry's"
    );
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), pid.to_string(), "{name}: QEMU alone in it");
    let limit = read_u64(&cgroup.join(if v1() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    }));
    assert!(
        limit > memory_mib << 20 && limit < (memory_mib + 1024) << 20,
        "{name}: memory limit {limit} is guest RAM plus some"
    );
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u != "0"),
        "{name}: QEMU runs as an unprivileged user (Uid: {uids})"
    );
    cgroup
}

#[test]
fn every_vm_runs_sandboxed_unprivileged_and_in_its_own_cgroup() {
    let _lock = vm_lock();
    let env = env();
    let pkg = tiny_package(&env);
    let pkg = pkg.to_str().unwrap();
    // A cold boot and a clone of a package, both detached.
    let bp = blueprint("tiny");
    let (mut boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "k-boot",
        ],
        Duration::from_secs(120),
    );
    let out = env.run(&[
        "run",
        "--package",
        pkg,
        "--clone",
        "--detach",
        "--name",
        "k-clone",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let boot_cg = assert_confined(&env, "k-boot", 256);
    let clone_cg = assert_confined(&env, "k-clone", 256);
    assert_ne!(boot_cg, clone_cg, "one cgroup per VM");

    // The guests work (the sandbox let QEMU do its job).
    let out = env.run(&["exec", "k-clone", "--", "echo", "hi"]);
    assert!(out.status.success(), "{}", describe(&out));

    // A suspend (a save through a descriptor) and a resume keep it confined.
    let out = env.run(&["run", "--package", pkg, "--detach", "--name", "k-own"]);
    assert!(out.status.success(), "{}", describe(&out));
    let own_cg = assert_confined(&env, "k-own", 256);
    let out = env.run(&["stop", "k-own"]);
    assert!(out.status.success(), "{}", describe(&out));
    wait_until(Duration::from_secs(10), "k-own's cgroup to go", || {
        (!own_cg.exists()).then_some(())
    });
    let out = env.run(&["start", "k-own"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_confined(&env, "k-own", 256);
    let out = env.run(&["exec", "k-own", "--", "echo", "hi"]);
    assert!(out.status.success(), "{}", describe(&out));

    // Each cgroup goes with its VM.
    for name in ["k-clone", "k-own"] {
        let out = env.run(&["stop", name, "--discard"]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    common::stop(&mut boot);
    for cg in [&boot_cg, &clone_cg] {
        wait_until(Duration::from_secs(10), "the cgroups to go", || {
            (!cg.exists()).then_some(())
        });
    }
}

#[test]
fn a_vm_over_its_memory_limit_is_killed_and_reported_and_others_run_on() {
    let _lock = vm_lock();
    let env = env();
    let pkg = tiny_package(&env);
    let pkg = pkg.to_str().unwrap();
    for name in ["m-hog", "m-calm"] {
        let out = env.run(&[
            "run",
            "--package",
            pkg,
            "--clone",
            "--detach",
            "--name",
            name,
        ]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let hog = assert_confined(&env, "m-hog", 256);
    let calm_pid = row(&env, "m-calm")["engine_pid"].as_u64().unwrap() as u32;

    // Lower m-hog's limit to a little above what it uses now, then have its
    // guest fill 160 MiB of its RAM (a clone's RAM is private to its QEMU:
    // new guest pages are QEMU's anonymous memory, which the kernel cannot
    // page out to the package).
    let (usage, limit) = if v1() {
        ("memory.usage_in_bytes", "memory.limit_in_bytes")
    } else {
        ("memory.current", "memory.max")
    };
    let now = read_u64(&hog.join(usage));
    std::fs::write(hog.join(limit), (now + (24 << 20)).to_string()).unwrap();
    let out = env.run(&[
        "exec",
        "m-hog",
        "--timeout",
        "60",
        "--",
        "sh",
        "-c",
        "head -c 167772160 /dev/zero > /fill; echo done",
    ]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("done"),
        "the guest should not get its memory: {}",
        describe(&out)
    );
    wait_until(Duration::from_secs(30), "m-hog to be reported", || {
        (row(&env, "m-hog")["state"] == "crashed").then_some(())
    });
    let table = String::from_utf8_lossy(&env.run(&["ps"]).stdout).into_owned();
    assert!(
        table.contains("went over its memory limit"),
        "ps says why m-hog stopped: {table}"
    );
    wait_until(Duration::from_secs(10), "m-hog's cgroup to go", || {
        (!hog.exists()).then_some(())
    });

    // The other VM is untouched.
    let calm = row(&env, "m-calm");
    assert_eq!(calm["state"], "running");
    assert_eq!(calm["engine_pid"].as_u64(), Some(calm_pid as u64));
    let out = env.run(&["exec", "m-calm", "--", "echo", "still here"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = env.run(&["stop", "m-calm", "--discard"]);
    assert!(out.status.success(), "{}", describe(&out));
    let _ = env.run(&["rm", "m-hog"]);
}
