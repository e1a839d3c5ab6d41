//! The `redis` recipe end to end: Debian minbase + redis-server, booted
//! under real QEMU, answering a real `redis-cli` inside the guest.
//! The first run on a machine debootstraps (about 1-2 minutes, cached).

use std::time::Duration;

use ferry_test_support::{
    blueprint, describe, qemu_pids, send_signal, spawn_until_live, vm_lock, wait_until, FerryEnv,
};

#[test]
fn redis_blueprint_boots_and_answers_ping() {
    let _lock = vm_lock();
    let env = FerryEnv::new(env!("CARGO_BIN_EXE_ferry"));
    let bp = blueprint("redis");
    let (mut boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "t-redis",
        ],
        Duration::from_secs(180),
    );
    let out = env.run(&["exec", "t-redis", "--", "redis-cli", "PING"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PONG\n");
    let out = env.run(&["exec", "t-redis", "--", "redis-cli", "SET", "k", "v1"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "OK\n",
        "{}",
        describe(&out)
    );
    let out = env.run(&["exec", "t-redis", "--", "redis-cli", "GET", "k"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "v1\n",
        "{}",
        describe(&out)
    );
    // It really is Debian with the packaged server.
    let out = env.run(&[
        "exec",
        "t-redis",
        "--",
        "sh",
        "-c",
        ". /etc/os-release; echo $VERSION_CODENAME; dpkg-query -W -f '${Status}' redis-server",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bookworm\ninstall ok installed",
        "{}",
        describe(&out)
    );

    send_signal(boot.id(), libc::SIGINT);
    let status = wait_until(Duration::from_secs(60), "ferry boot to exit", || {
        boot.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    assert!(qemu_pids("t-redis").is_empty());
    assert!(!env.vm_dir("t-redis").exists());
}
