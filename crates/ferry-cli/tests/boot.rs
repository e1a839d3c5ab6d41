//! `ferry boot` and `ferry exec` with real QEMU and the real `tiny` guest.

use std::process::Stdio;
use std::time::Duration;

use ferry_test_support::{
    blueprint, describe, qemu_pids, send_signal, spawn_until_live, vm_lock, wait_until, FerryEnv,
};

fn env() -> FerryEnv {
    FerryEnv::new(env!("CARGO_BIN_EXE_ferry"))
}

#[test]
fn boot_tiny_until_live_then_exit() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    let out = env.run(&[
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--exit-when-live",
        "--name",
        "t-boot",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let accel = stdout.lines().next().unwrap_or_default();
    assert!(
        accel == "accel: kvm" || accel.starts_with("accel: tcg ("),
        "first line should name the accelerator: {stdout}"
    );
    let live = stdout
        .lines()
        .find(|l| l.starts_with("live in "))
        .expect("a 'live in N ms' line");
    let ms: u64 = live
        .trim_start_matches("live in ")
        .trim_end_matches(" ms")
        .parse()
        .expect("a number");
    assert!(ms > 0 && ms < 120_000, "{live}");
    assert!(
        !env.vm_dir("t-boot").exists(),
        "the state dir is removed after exit"
    );
    assert!(qemu_pids("t-boot").is_empty(), "no QEMU is left behind");
}

#[test]
fn exec_runs_commands_in_a_running_vm_and_ctrl_c_stops_it() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    let (mut boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "t-exec",
        ],
        Duration::from_secs(120),
    );

    // Exit code, stdout and stderr come back separately.
    let out = env.run(&[
        "exec",
        "t-exec",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // The service the recipe names is up and serving.
    let out = env.run(&[
        "exec",
        "t-exec",
        "--",
        "wget",
        "-qO-",
        "http://127.0.0.1:8080/",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a ferry tiny guest\n"
    );

    // The guest is networked as the blueprint says.
    let out = env.run(&["exec", "t-exec", "--", "ip", "-4", "addr", "show", "eth0"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("172.100.100.2/30"),
        "{}",
        describe(&out)
    );

    // Standard input reaches the command with -i.
    let mut child = env
        .cmd()
        .args(["exec", "-i", "t-exec", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"ferry\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "FERRY\n");

    // A missing program is 127, as in a shell; a timeout is reported.
    let out = env.run(&["exec", "t-exec", "--", "no-such-program"]);
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));
    let out = env.run(&["exec", "t-exec", "--timeout", "1", "--", "sleep", "30"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--timeout"),
        "{}",
        describe(&out)
    );
    assert!(!out.status.success());

    // The name is taken while the VM runs.
    let out = env.run(&[
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--name",
        "t-exec",
        "--exit-when-live",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by a running VM"),
        "{}",
        describe(&out)
    );

    // Ctrl-C: clean shutdown, state dir removed, no QEMU left.
    assert!(!qemu_pids("t-exec").is_empty());
    send_signal(boot.id(), libc::SIGINT);
    let out = wait_until(Duration::from_secs(60), "ferry boot to exit", || {
        boot.try_wait().unwrap()
    });
    assert!(out.success(), "ferry boot exits 0 after Ctrl-C: {out}");
    assert!(!env.vm_dir("t-exec").exists());
    assert!(qemu_pids("t-exec").is_empty());

    // And exec now says plainly that there is no such VM.
    let out = env.run(&["exec", "t-exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running VM is named 't-exec'"),
        "{}",
        describe(&out)
    );
}
