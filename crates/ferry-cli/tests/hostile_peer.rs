//! A hostile migration source: `ferry peer --from HOST:PORT` against a small
//! Rust stand-in that speaks the protocol (`docs/migration-protocol.md`)
//! and lies. Each lie is refused with one clear line, before any VM is
//! made, and leaves nothing behind: no VM directory, no file in the blob
//! cache, nothing where a path-like digest points. No VM is booted.
//!
//! Checked to fail without the defences by reverting each once locally:
//! without the blob-size check (and the removal of a partial blob) the
//! destination read what was announced and failed later, on the sha256,
//! without naming the lie; without `MAX_LINE` the 2 MiB line was read whole
//! (the transport's own test covers that one).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_test_support::{describe, watchdog};

mod common;

const TOKEN: &str = "hostile-test-token-0123";

/// An offer as a source sends it, with `kernel` as given.
fn offer(kernel: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"type": "offer", "session": "s1", "vm": {
        "name": "victim",
        "meta": {
            "ferry_version": "0.1.0", "written_unix": 1700000000u64, "generation": 0,
            "provenance": {
                "engine": "qemu", "engine_version": "7.2.0", "cpu_model": "max",
                "accel": "tcg", "memory_mib": 64, "cpus": 1
            },
            "recipe": "tiny", "cmdline": "console=ttyS0",
            "network": {
                "interface": "eth0", "guest_address": "172.100.100.2",
                "prefix_len": 30, "gateway": "172.100.100.1"
            },
            "liveness": {"kind": "none"}
        },
        "disk_size": 1u64 << 20,
        "kernel": kernel,
        "initramfs": {"sha256": "cd".repeat(32), "size": 100}
    }})
}

/// A source that takes one connection, reads its hello, and then plays
/// `script` (given the stream and a reader of what the destination says).
fn source(
    script: impl FnOnce(&mut TcpStream, &mut BufReader<TcpStream>) + Send + 'static,
) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut hello = String::new();
        reader.read_line(&mut hello).unwrap();
        assert!(hello.contains(TOKEN), "{hello}");
        script(&mut stream, &mut reader);
    });
    (addr, t)
}

fn send(stream: &mut TcpStream, msg: &serde_json::Value) {
    let mut line = serde_json::to_vec(msg).unwrap();
    line.push(b'\n');
    let _ = stream.write_all(&line);
}

/// Sends the offer, waits for the kernel's fetch, answers with a blob
/// header of `len` and `bytes` bytes, then closes.
fn lying_blob(
    size: u64,
    len: u64,
    bytes: usize,
) -> impl FnOnce(&mut TcpStream, &mut BufReader<TcpStream>) {
    move |stream, reader| {
        send(
            stream,
            &offer(serde_json::json!({"sha256": "ab".repeat(32), "size": size})),
        );
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(r#""type":"fetch""#), "{line}");
        send(
            stream,
            &serde_json::json!({"type": "blob", "name": "kernel", "len": len}),
        );
        let _ = stream.write_all(&vec![0u8; bytes]);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Read what the destination says until it closes.
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(reader, &mut rest);
    }
}

/// Files under `dir`, recursively.
fn files_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(files_in(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// Runs the destination against `addr` and checks the refusal: one error
/// line containing `needle`, nothing left behind.
fn refused(addr: &str, needle: &str) -> Output {
    let env = common::env();
    let cache = tempfile::tempdir().unwrap();
    let out = env
        .cmd()
        .env("FERRY_CACHE", cache.path())
        .args([
            "peer", "--from", addr, "--token", TOKEN, "--net", "none", "--name", "h1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let line = common::error_line(&out);
    assert!(line.contains(needle), "{line}");
    assert!(!env.vm_dir("h1").exists(), "a VM directory was left");
    // What the destination learnt of its own QEMU (its version, asked
    // while the blobs arrive) may stay, and the mark of the memo's daily
    // prune that keeping it left; nothing of the source's.
    let memo_of_qemu = cache.path().join("memo").join("qemu-version-");
    let prune_mark = cache.path().join("memo").join(".pruned");
    let left: Vec<String> = files_in(cache.path())
        .into_iter()
        .filter(|f| !f.starts_with(&*memo_of_qemu.to_string_lossy()))
        .filter(|f| *f != prune_mark.to_string_lossy())
        .collect();
    assert_eq!(left, Vec::<String>::new(), "left in the cache");
    assert_eq!(
        files_in(&env.state.path().join("vms")),
        Vec::<String>::new(),
        "left in the state"
    );
    out
}

#[test]
fn a_path_like_digest_is_refused() {
    let _limit = watchdog::time_limit(Duration::from_secs(120));
    let target = std::env::temp_dir().join(format!("ferry-hostile-{}", std::process::id()));
    for digest in [
        format!("../../../../../../../..{}", target.display()),
        target.display().to_string(),
    ] {
        let d = digest.clone();
        let (addr, src) = source(move |stream, reader| {
            send(
                stream,
                &offer(serde_json::json!({"sha256": d, "size": 100})),
            );
            let mut said = String::new();
            let _ = reader.read_line(&mut said);
            assert!(said.contains(r#""type":"abort""#), "{said}");
        });
        refused(
            &addr,
            &format!("the offer gives the kernel digest {digest:?}, which is not a SHA-256"),
        );
        src.join().unwrap();
        assert!(!target.exists(), "{} was written", target.display());
    }
}

#[test]
fn a_blob_longer_or_shorter_than_offered_is_refused() {
    let _limit = watchdog::time_limit(Duration::from_secs(120));
    // Announced longer than offered.
    let (addr, src) = source(lying_blob(100, 200, 200));
    refused(
        &addr,
        "the source offered a kernel of 100 bytes and sends 200",
    );
    src.join().unwrap();
    // Announced shorter than offered.
    let (addr, src) = source(lying_blob(100, 50, 50));
    refused(
        &addr,
        "the source offered a kernel of 100 bytes and sends 50",
    );
    src.join().unwrap();
    // Announced right, then cut short.
    let (addr, src) = source(lying_blob(100, 100, 40));
    refused(&addr, "sent 40 of the 100 bytes it announced");
    src.join().unwrap();
}

/// The blob is hashed as it arrives (not read again afterwards); what does
/// not match the offer's digest is removed, and no digest of it is
/// remembered in the cache's memo.
#[test]
fn a_blob_whose_content_does_not_match_its_digest_is_refused() {
    let _limit = watchdog::time_limit(Duration::from_secs(120));
    let (addr, src) = source(lying_blob(100, 100, 100));
    refused(&addr, "the kernel received does not match its sha256");
    src.join().unwrap();
}

#[test]
fn an_oversized_control_line_is_refused() {
    let _limit = watchdog::time_limit(Duration::from_secs(120));
    let (addr, src) = source(|stream, _| {
        let _ = stream.write_all(&vec![b' '; 2 << 20]);
        let _ = stream.write_all(b"\n");
    });
    refused(&addr, "sent a control line longer than 1048576 bytes");
    src.join().unwrap();
}
