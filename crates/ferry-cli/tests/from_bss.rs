//! `ferry boot --from-bss URL --mac MAC` against the real `ferry
//! boot-service` binary and real QEMU: the `tiny` blueprint's kernel,
//! initramfs and disk are registered with the service as files (with
//! `#sha256=` digests), a node is registered for a MAC, and ferry boots
//! what the service says.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{env, error_line, exec, stop};
use ferry_blueprint::Blueprint;
use ferry_test_support::{
    blueprint, describe, ports, qemu_pids, spawn_until, spawn_until_live, vm_lock, FerryEnv,
    KillOnDrop,
};
use serde_json::{json, Value};

const MAC: &str = "de:ca:fc:0f:fe:e1";
const XNAME: &str = "x1000c1s7b0n0";
const PARAMS: &str = "ferry.test=from-bss-1 nomodeset";

/// `ferry boot-service` on `127.0.0.1:port` with `store`, until it
/// listens.
fn service(store: &Path, port: u16) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env_remove("FERRY_LOG")
        .args(["boot-service", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--store")
        .arg(store);
    spawn_until(cmd, "listening on ", Duration::from_secs(30)).0
}

/// A free port with a boot service on it.
fn service_on_free_port(store: &Path) -> (KillOnDrop, u16) {
    let port = ports::free_port();
    (service(store, port), port)
}

fn http(method: &str, url: &str, body: Option<&Value>) -> (u16, String) {
    common::http_json(method, url, body, None)
}

/// The tiny blueprint's kernel, initramfs and disk in the store's
/// `files/`; their `(name, sha256)`.
fn serve_tiny(store: &Path) -> Vec<(&'static str, String)> {
    let bp = Blueprint::load(&blueprint("tiny")).unwrap();
    let files = store.join("files");
    std::fs::create_dir_all(&files).unwrap();
    [
        ("vmlinuz", bp.kernel()),
        ("initramfs.cpio.gz", bp.initramfs()),
        ("tiny-disk.img", bp.disk()),
    ]
    .into_iter()
    .map(|(name, from)| {
        std::fs::copy(&from, files.join(name)).unwrap();
        (name, common::sha256_hex(&from))
    })
    .collect()
}

/// Registers the node as a user of SMD and BSS would: its component, its
/// interface with `MAC`, and boot parameters naming the files with their
/// digests (the kernel's digest replaced by `kernel_digest` if given).
fn register(url: &str, files: &[(&str, String)], kernel_digest: Option<&str>) {
    let (code, body) = http(
        "POST",
        &format!("{url}/hsm/v2/State/Components"),
        Some(&json!({"Components":[{"ID": XNAME, "Role": "Compute", "NID": 1}]})),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = http(
        "POST",
        &format!("{url}/hsm/v2/Inventory/EthernetInterfaces"),
        Some(&json!({"MACAddress": MAC, "ComponentID": XNAME})),
    );
    assert_eq!(code, 201, "{body}");
    let file_url = |i: usize, digest: &str| format!("{url}/files/{}#sha256={digest}", files[i].0);
    let (code, body) = http(
        "POST",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({
            "hosts": [XNAME],
            "kernel": file_url(0, kernel_digest.unwrap_or(&files[0].1)),
            "initrd": file_url(1, &files[1].1),
            "params": format!("{PARAMS} root=live:{}", file_url(2, &files[2].1)),
            "cloud-init": {"meta-data": {"ferry-test": "meta-from-bss"}},
        })),
    );
    assert_eq!(code, 201, "{body}");
}

fn boot_args<'a>(url: &'a str, mac: &'a str, name: &'a str) -> Vec<&'a str> {
    vec!["boot", "--from-bss", url, "--mac", mac, "--name", name]
}

/// What a guest sees of its boot: NIC address and command line (without
/// what the engine adds: the TSC rate it measures on each start, and
/// `reboot=t`).
fn guest_view(env: &FerryEnv, name: &str) -> (String, String) {
    let cmdline = exec(env, name, "cat /proc/cmdline")
        .split_whitespace()
        .filter(|w| !w.starts_with("tsc_early_khz=") && *w != "tsc=reliable" && *w != "reboot=t")
        .collect::<Vec<_>>()
        .join(" ");
    (exec(env, name, "cat /sys/class/net/eth0/address"), cmdline)
}

#[test]
fn a_node_boots_from_the_boot_service_with_its_mac_params_and_cloud_init() {
    let _lock = vm_lock();
    let env = env();
    let store = env.state.path().join("bss-store");
    let files = serve_tiny(&store);
    let (svc, port) = service_on_free_port(&store);
    let url = format!("http://127.0.0.1:{port}");
    register(&url, &files, None);

    // A host service the guest must not reach: on loopback and on every
    // address.
    let forbidden = TcpListener::bind("0.0.0.0:0").unwrap();
    let forbidden_port = forbidden.local_addr().unwrap().port();
    forbidden.set_nonblocking(true).unwrap();

    let (mut boot, lines) = spawn_until_live(
        &env,
        &boot_args(&url, "DE-CA-FC-0F-FE-E1", "n1"),
        Duration::from_secs(180),
    );
    assert!(
        lines.iter().any(|l| l.starts_with("accel: "))
            && lines
                .iter()
                .any(|l| l.starts_with(&format!("fetched the boot data of {MAC} from {url}"))),
        "the same events as 'ferry boot', and what was fetched: {lines:?}"
    );
    let (mac, cmdline) = guest_view(&env, "n1");
    assert_eq!(mac, MAC, "the guest NIC has the node's MAC");
    assert!(
        cmdline.contains(PARAMS),
        "the params are on the command line: {cmdline}"
    );
    assert!(
        cmdline.starts_with("console=ttyS0 panic=-1"),
        "after ferry's own: {cmdline}"
    );
    let gw = format!("http://172.100.100.1:{port}");
    assert!(
        cmdline.contains(&format!("ds=nocloud-net;s={gw}/cloud-init/{MAC}/"))
            && cmdline.contains(&format!("root=live:{gw}/files/tiny-disk.img#sha256=")),
        "loopback URLs are rewritten to the gateway: {cmdline}"
    );
    assert!(!cmdline.contains("127.0.0.1"), "{cmdline}");

    // The guest reaches the service through the forward, at the URL its
    // command line names: cloud-init's meta-data and a file of its params.
    let meta = exec(
        &env,
        "n1",
        "s=$(sed -n 's/.*ds=nocloud-net;s=\\([^ ]*\\).*/\\1/p' /proc/cmdline); wget -q -O - \"${s}meta-data\"",
    );
    let meta: Value = serde_json::from_str(&meta).unwrap_or_else(|e| panic!("{e}: {meta}"));
    assert_eq!(meta["ferry-test"], "meta-from-bss", "{meta}");
    assert_eq!(meta["local-hostname"], XNAME, "{meta}");
    let head = exec(
        &env,
        "n1",
        &format!("wget -q -O /dev/null {gw}/files/vmlinuz && echo reachable"),
    );
    assert_eq!(head, "reachable");

    // Guest isolation holds: no other host port, at the gateway or at the
    // host's own addresses.
    let host_addrs = String::from_utf8(
        Command::new("ip")
            .args(["-4", "-o", "addr", "show", "scope", "global"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mut targets = vec![format!("172.100.100.1:{forbidden_port}")];
    targets.extend(
        host_addrs
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next())
            .filter(|a| !a.starts_with("10.201."))
            .map(|a| format!("{a}:{forbidden_port}"))
            .take(2),
    );
    // (busybox's `wget -T` crashes in this guest; `nc` under `timeout`
    // does not, and gives up on a connection that never answers.)
    for target in &targets {
        let (addr, port) = target.rsplit_once(':').unwrap();
        let out = env.run(&[
            "exec",
            "n1",
            "--",
            "sh",
            "-c",
            &format!("printf x | timeout 5 nc -w 3 {addr} {port}; echo tried"),
        ]);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("tried")
                && !String::from_utf8_lossy(&out.stderr).contains("not found"),
            "{target}: {}",
            describe(&out)
        );
        assert!(
            forbidden.accept().is_err(),
            "the guest connected to {target}, a host port that no forward names"
        );
    }

    let out = stop(&mut boot);
    assert!(out.status.success(), "{}", describe(&out));

    // The service restarts (same store, same port) while a second boot
    // waits for it: ferry retries, then boots the same data.
    drop(svc);
    let started = Instant::now();
    let mut cmd = env.cmd();
    cmd.args(boot_args(&url, MAC, "n1"));
    let restart = std::thread::spawn({
        let store = store.clone();
        move || {
            std::thread::sleep(Duration::from_millis(1500));
            service(&store, port)
        }
    });
    let (mut boot, _) = spawn_until(cmd, "live in ", Duration::from_secs(180));
    let _svc = restart.join().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let (mac2, cmdline2) = guest_view(&env, "n1");
    assert_eq!((mac2, cmdline2), (mac, cmdline), "the same boot data");
    let out = stop(&mut boot);
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not answer") && stderr.contains("try 2 of"),
        "the retries are said: {stderr}"
    );
}

#[test]
fn a_wrong_digest_an_unknown_mac_or_a_bad_mac_start_no_vm() {
    let _lock = vm_lock();
    let env = env();
    let store = env.state.path().join("bss-store");
    let files = serve_tiny(&store);
    let (_svc, port) = service_on_free_port(&store);
    let url = format!("http://127.0.0.1:{port}");
    register(&url, &files, Some(&"0".repeat(64)));

    let out = env.run(&boot_args(&url, MAC, "n-digest"));
    let line = common::assert_refused(&env, &out, "n-digest", "sha256 is");
    assert!(line.contains("vmlinuz"), "{line}");

    let out = env.run(&boot_args(&url, "de:ca:fc:0f:fe:99", "n-unknown"));
    common::assert_refused(
        &env,
        &out,
        "n-unknown",
        "no boot data for de:ca:fc:0f:fe:99",
    );

    let out = env.run(&boot_args(&url, "de:ca:fc:0f:fe", "n-bad"));
    common::assert_refused(&env, &out, "n-bad", "--mac");

    // A kernel URL that 404s.
    let (code, body) = http(
        "PATCH",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({"hosts": [XNAME], "kernel": format!("{url}/files/missing")})),
    );
    assert_eq!(code, 200, "{body}");
    let out = env.run(&boot_args(&url, MAC, "n-404"));
    common::assert_refused(&env, &out, "n-404", "HTTP 404");

    // With Unknown-x86_64 set, an unknown MAC gets its data (here with a
    // wrong digest, so nothing boots: the error shows whose data it was).
    let (code, body) = http(
        "POST",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({
            "hosts": ["Unknown-x86_64"],
            "kernel": format!("{url}/files/vmlinuz#sha256={}", "1".repeat(64)),
            "initrd": format!("{url}/files/initramfs.cpio.gz"),
        })),
    );
    assert_eq!(code, 201, "{body}");
    let out = env.run(&boot_args(&url, "de:ca:fc:0f:fe:99", "n-unknown2"));
    common::assert_refused(&env, &out, "n-unknown2", &"1".repeat(64));
}

#[test]
fn a_boot_service_that_stays_down_is_retried_then_one_clear_line() {
    let _lock = vm_lock();
    let env = env();
    let port = ports::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let out = env.run(&boot_args(&url, MAC, "n-down"));
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains(&format!("the boot service at {url}")) && line.contains("after 5 tries"),
        "{line}"
    );
    assert!(
        took >= Duration::from_millis(7000),
        "it waited 0.5 + 1 + 2 + 4 s: {took:?}"
    );
    assert!(!env.vm_dir("n-down").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("did not answer"))
            .count(),
        5,
        "four retries said, then the error: {stderr}"
    );
}

/// Boot parameters for a node with MAC whose root is `ferry.root=` of the
/// tiny disk, with `digest` in its URL.
fn register_ram_root(url: &str, files: &[(&str, String)], mac: &str, digest: &str) {
    let file_url = |i: usize| format!("{url}/files/{}#sha256={}", files[i].0, files[i].1);
    let (code, body) = http(
        "POST",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({
            "macs": [mac],
            "kernel": file_url(0),
            "initrd": file_url(1),
            "params": format!("ferry.root={url}/files/{}#sha256={digest}", files[2].0),
        })),
    );
    assert_eq!(code, 201, "{body}");
}

#[test]
fn ferry_root_puts_the_image_in_ram_and_a_wrong_digest_powers_the_guest_off() {
    let _lock = vm_lock();
    let env = env();
    let store = env.state.path().join("bss-store");
    let files = serve_tiny(&store);
    let (_svc, port) = service_on_free_port(&store);
    let url = format!("http://127.0.0.1:{port}");
    let good = "de:ca:fc:0f:fe:21";
    let bad = "de:ca:fc:0f:fe:22";
    register_ram_root(&url, &files, good, &files[2].1);
    register_ram_root(&url, &files, bad, &"0".repeat(64));

    // The guest fetched its root into RAM: / is a loop device, the disk
    // (the placeholder) is not mounted, and the image is not in the VM's
    // directory on the host.
    let (mut boot, lines) = spawn_until_live(
        &env,
        &boot_args(&url, good, "n-ram"),
        Duration::from_secs(180),
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("the guest fetches its root image (ferry.root=) into RAM")),
        "{lines:?}"
    );
    let root = exec(&env, "n-ram", "awk '$2 == \"/\" {print $1}' /proc/mounts");
    assert!(root.starts_with("/dev/loop"), "root is {root}");
    assert_eq!(
        exec(&env, "n-ram", "grep -c '^/dev/vda' /proc/mounts || true"),
        "0"
    );
    assert_eq!(
        exec(&env, "n-ram", "cat /srv/www/index.html"),
        "hello from a ferry tiny guest"
    );
    let boot_dir = env.vm_dir("n-ram").join("boot");
    assert!(!boot_dir.join("rootfs").exists());
    assert_eq!(
        std::fs::metadata(boot_dir.join("empty.img")).unwrap().len(),
        1 << 20
    );
    let out = stop(&mut boot);
    assert!(out.status.success(), "{}", describe(&out));

    // A digest that differs: the initramfs says so and powers off; ferry
    // reports the stop with that line.
    let out = env.run(&boot_args(&url, bad, "n-ram-bad"));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ferry-init: the root image")
            && stderr.contains(&format!("has sha256 {}", files[2].1))
            && stderr.contains(&format!("the URL says {}", "0".repeat(64))),
        "{}",
        describe(&out)
    );
    assert!(qemu_pids("n-ram-bad").is_empty());
}
