//! The `web` recipe end to end: busybox plus the host-built `ferry-web`,
//! booted under real QEMU, answering through an exposed port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ferry_test_support::ports::retry_on_port_clash;
use ferry_test_support::{
    blueprint, describe, qemu_pids, send_signal, try_spawn_until_live, vm_lock, wait_until,
    FerryEnv,
};

/// One request to 127.0.0.1:port; the status and body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: w1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    s.write_all(&request).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&answer)));
    let status = String::from_utf8_lossy(&answer[..end])
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, answer[end + 4..].to_vec())
}

#[test]
fn web_blueprint_serves_health_and_storage_through_an_exposed_port() {
    let _lock = vm_lock();
    let env = FerryEnv::new(env!("CARGO_BIN_EXE_ferry"));
    let bp = blueprint("web");
    let (mut boot, port) = retry_on_port_clash(1, |port| {
        try_spawn_until_live(
            &env,
            &[
                "boot",
                "--blueprint",
                bp.to_str().unwrap(),
                "--name",
                "w1",
                "--expose",
                &format!("127.0.0.1:{port}:8000"),
            ],
            Duration::from_secs(180),
        )
        .map(|(boot, _)| (boot, port))
    });

    // No fleet file yet: the name is the guest's hostname.
    let (status, health) = http(port, "GET", "/health", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&health));
    let health: serde_json::Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(
        health,
        serde_json::json!({"status": "ok", "name": "ferry-web"})
    );

    let (status, put) = http(port, "POST", "/storage/greeting", b"hello from the host");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&put));
    assert_eq!(
        http(port, "GET", "/storage/greeting", b""),
        (200, b"hello from the host".to_vec())
    );
    // It is a file on the guest's disk.
    let out = env.run(&["exec", "w1", "--", "cat", "/var/lib/ferry-web/greeting"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(out.stdout, b"hello from the host");

    send_signal(boot.id(), libc::SIGINT);
    let status = wait_until(Duration::from_secs(60), "ferry boot to exit", || {
        boot.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    assert!(qemu_pids("w1").is_empty());
}
