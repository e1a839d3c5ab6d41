//! `ferry registry` as a user runs it: it says what it serves and where,
//! answers over HTTP, refuses a taken port or a damaged package with one
//! line and exit code 3, and stops cleanly on SIGINT or SIGTERM. No VM is
//! booted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ferry_package::{PackageWriter, SectionKind, VmMeta};
use ferry_test_support::{describe, send_signal, KillOnDrop};

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_LOG");
    c
}

/// A small package `dir/name`.
fn package(dir: &Path, name: &str) -> PathBuf {
    let dest = dir.join(name);
    let mut w = PackageWriter::create(&dest).unwrap();
    w.add_bytes(SectionKind::Config, br#"{"vcpus":1}"#).unwrap();
    w.add_bytes(SectionKind::Memory, &vec![7u8; 100_000])
        .unwrap();
    let meta = serde_json::json!({
        "ferry_version": "0.0.0-test", "written_unix": 0, "generation": 0,
        "provenance": {
            "engine": "test", "engine_version": "1", "cpu_model": "max",
            "accel": "tcg", "memory_mib": 64, "cpus": 1
        },
        "recipe": name, "cmdline": "",
        "network": {
            "interface": "eth0", "guest_address": "172.100.100.2",
            "prefix_len": 30, "gateway": "172.100.100.1"
        },
        "liveness": {"kind": "none"}
    });
    w.commit(&VmMeta::from_json(&meta, "test").unwrap())
        .unwrap();
    dest
}

/// `ferry registry ARGS` running, with the lines it printed up to
/// `listening on http://ADDR`.
struct Running {
    child: KillOnDrop,
    lines: Vec<String>,
    addr: SocketAddr,
}

fn start(args: &[&str]) -> Running {
    let mut child = ferry()
        .arg("registry")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut child = KillOnDrop::new(child);
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let addr = line
                    .strip_prefix("listening on http://")
                    .or_else(|| line.strip_prefix("listening on https://"))
                    .map(|a| a.parse().expect("an address"));
                lines.push(line);
                if let Some(addr) = addr {
                    return Running { child, lines, addr };
                }
            }
            Err(e) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                panic!("ferry registry {args:?} did not start ({e}): {lines:?} {err}");
            }
        }
    }
}

impl Running {
    /// Sends `signal` and waits for the exit.
    fn stop(self, signal: i32) -> Output {
        send_signal(self.child.id(), signal);
        self.child.into_inner().wait_with_output().unwrap()
    }
}

/// `GET path` over a plain socket: the status and body.
fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, raw[split + 4..].to_vec())
}

/// The one `ferry: ` error line of a failed run.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ferry: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {}", describe(out));
    lines[0].to_string()
}

#[test]
fn serves_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let b = package(dir.path(), "b.ferry");
    let r = start(&[
        "--package",
        a.to_str().unwrap(),
        "--package",
        b.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(r.lines.len(), 3, "{:?}", r.lines);
    assert!(
        r.lines[0].starts_with(&format!("serving {} (", a.display()))
            && r.lines[0].ends_with(" as /packages/a.ferry"),
        "{:?}",
        r.lines
    );
    assert!(
        r.lines[1].ends_with(" as /packages/b.ferry"),
        "{:?}",
        r.lines
    );

    let (status, body) = get(r.addr, "/", None);
    assert_eq!(status, 200);
    let listing: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<_> = listing["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a.ferry", "b.ferry"]);
    let (status, body) = get(r.addr, "/packages/b.ferry", None);
    assert_eq!(status, 200);
    assert_eq!(body, std::fs::read(&b).unwrap());

    let addr = r.addr;
    let out = r.stop(libc::SIGINT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(TcpStream::connect(addr).is_err(), "it no longer listens");
}

#[test]
fn token_file_is_trimmed_and_sigterm_stops() {
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let token = dir.path().join("token");
    std::fs::write(&token, "  tok-42-tok-42-tok-42\n").unwrap();
    let r = start(&[
        "--package",
        a.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(get(r.addr, "/", None).0, 401);
    assert_eq!(get(r.addr, "/", Some("tok")).0, 401);
    assert_eq!(get(r.addr, "/", Some("tok-42-tok-42-tok-42")).0, 200);
    let out = r.stop(libc::SIGTERM);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_taken_port_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ferry()
        .args([
            "registry",
            "--package",
            a.to_str().unwrap(),
            "--listen",
            &addr,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.starts_with(&format!("ferry: cannot listen on {addr}: ")),
        "{line}"
    );
    assert!(
        line.contains("pick another address with --listen"),
        "{line}"
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out));
}

#[test]
fn a_damaged_package_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let mut bytes = std::fs::read(&a).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 1; // inside the section table
    std::fs::write(&a, bytes).unwrap();
    let out = ferry()
        .args([
            "registry",
            "--package",
            a.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(
        error_line(&out),
        format!(
            "ferry: cannot serve a package: {}: the section table is corrupt (its checksum does not match the one in the header): the package is damaged; fetch or rebuild it",
            a.display()
        )
    );

    let out = ferry()
        .args(["registry", "--package", "/nonexistent/x.ferry"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("/nonexistent/x.ferry"));
}

#[test]
fn usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let a = a.to_str().unwrap();
    for args in [
        vec!["registry"],
        vec![
            "registry",
            "--package",
            a,
            "--token",
            "t-t-t-t-t-t-t-t-t-t",
            "--token-file",
            "f",
        ],
        vec!["registry", "--package", a, "--listen", "nowhere"],
    ] {
        let out = ferry().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
    let out = ferry()
        .args([
            "registry",
            "--package",
            a,
            "--token-file",
            "/nonexistent/token",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("cannot read the token file /nonexistent/token"));
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let out = ferry()
        .args(["registry", "--package", a, "--token-file"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("token is empty"),
        "{}",
        describe(&out)
    );
}

/// Short and empty tokens are refused on every token flag of `registry` and
/// `peer`, when the flags are read: one line naming the fix, exit 3, and no
/// network I/O (a listener standing for the registry or the source peer
/// sees no connection). Checked to fail without the defence by letting
/// `Token::new` accept any non-empty token: `peer --token abc` then dialled
/// the listener.
#[test]
fn short_tokens_are_refused_before_any_network_io() {
    let _limit = ferry_test_support::watchdog::time_limit(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let a = a.to_str().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n").unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "0123456789abcdef\n").unwrap();
    let (short, empty, good) = (
        short.to_str().unwrap(),
        empty.to_str().unwrap(),
        good.to_str().unwrap(),
    );
    let watch = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    watch.set_nonblocking(true).unwrap();
    let peer = watch.local_addr().unwrap().to_string();
    let http = format!("http://{peer}/");
    let fix = "use at least 16 (e.g. `openssl rand -hex 16`)";
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["registry", "--package", a, "--listen", "127.0.0.1:0", "--token", "abc"],
            format!("ferry: --token: the token is 3 characters; {fix}"),
        ),
        (
            vec!["registry", "--package", a, "--listen", "127.0.0.1:0", "--token-file", short],
            format!("ferry: --token-file {short}: the token is 3 characters; {fix}"),
        ),
        (
            vec!["registry", "--package", a, "--listen", "127.0.0.1:0", "--registry-token-file", empty],
            format!("ferry: --registry-token-file {empty}: the token is empty; use at least 16 characters (e.g. `openssl rand -hex 16`)"),
        ),
        (
            vec!["peer", "--from", &peer, "--token", ""],
            "ferry: --token: the token is empty; use at least 16 characters (e.g. `openssl rand -hex 16`)".into(),
        ),
        (
            vec!["peer", "--from", &peer, "--listen", "127.0.0.1:0", "--token", "abc"],
            format!("ferry: --token: the token is 3 characters; {fix}"),
        ),
        (
            vec!["peer", "--from", &peer, "--token-file", good, "--migrate-token-file", short],
            format!("ferry: --migrate-token-file {short}: the token is 3 characters; {fix}"),
        ),
        (
            vec!["peer", "--from", &http, "--token-file", good, "--registry-token-file", empty],
            format!("ferry: --registry-token-file {empty}: the token is empty; use at least 16 characters (e.g. `openssl rand -hex 16`)"),
        ),
        // Plain links off loopback need --insecure (checked before tokens
        // are used, and before any connection).
        (
            vec!["peer", "--from", "192.0.2.1:7100", "--token-file", good],
            "ferry: --from 192.0.2.1:7100: plain TCP off loopback sends the token and the VM's memory in clear: use TLS (--ca for a peer --from, --tls-cert for --listen, an https:// registry) or loopback addresses, or pass --insecure".into(),
        ),
        (
            vec!["peer", "--from", &peer, "--listen", "0.0.0.0:7100", "--token-file", good],
            "ferry: --listen 0.0.0.0:7100: plain TCP off loopback sends the token and the VM's memory in clear: use TLS (--ca for a peer --from, --tls-cert for --listen, an https:// registry) or loopback addresses, or pass --insecure".into(),
        ),
        (
            vec!["peer", "--from", "http://reg.example:7070/", "--token-file", good],
            "ferry: --from http://reg.example:7070/: plain TCP off loopback sends the token and the VM's memory in clear: use TLS (--ca for a peer --from, --tls-cert for --listen, an https:// registry) or loopback addresses, or pass --insecure".into(),
        ),
    ];
    for (args, line) in cases {
        let out = ferry().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", describe(&out));
        assert_eq!(error_line(&out), line, "{args:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("0123456789abcdef"),
            "a token is never printed: {}",
            describe(&out)
        );
        assert!(
            watch.accept().is_err(),
            "{args:?} connected before refusing its token"
        );
    }
}

/// `--registry-token-file` overrides `--token` for the registry role: the
/// shared token then opens nothing (a token for the wrong role is refused).
#[test]
fn a_role_token_replaces_the_shared_one() {
    let _limit = ferry_test_support::watchdog::time_limit(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let reg = dir.path().join("registry-token");
    std::fs::write(&reg, "registry-0123456789\n").unwrap();
    let r = start(&[
        "--package",
        a.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--token",
        "shared-0123456789",
        "--registry-token-file",
        reg.to_str().unwrap(),
    ]);
    assert_eq!(get(r.addr, "/", Some("shared-0123456789")).0, 401);
    assert_eq!(get(r.addr, "/", Some("registry-0123456789")).0, 200);
    let out = r.stop(libc::SIGTERM);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// `ferry tls init` and a registry that speaks only TLS; plain HTTP off
/// loopback needs --insecure. Checked to fail without the defence: before
/// it, `--listen 0.0.0.0:0` served plain HTTP without a word.
#[test]
fn tls_init_and_a_tls_registry() {
    use std::os::unix::fs::PermissionsExt;
    let _limit = ferry_test_support::watchdog::time_limit(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let a = package(dir.path(), "a.ferry");
    let a = a.to_str().unwrap();
    let tls = dir.path().join("tls");
    let out = ferry()
        .args(["tls", "init"])
        .arg(&tls)
        .args(["--san", "reg.test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("valid for localhost, 127.0.0.1, reg.test")
    );
    for key in ["server.key", "client.key"] {
        let mode = std::fs::metadata(tls.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // Again into the same directory: refused, nothing replaced.
    let out = ferry().args(["tls", "init"]).arg(&tls).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("never overwrites keys"));

    let (cert, key) = (tls.join("server.crt"), tls.join("server.key"));
    let r = start(&[
        "--package",
        a,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        r.lines
            .iter()
            .any(|l| l.starts_with("listening on https://127.0.0.1:")),
        "{:?}",
        r.lines
    );
    // `peer --from https://…`: without --ca the certificate is refused;
    // with it the package is read (this test package then fails later, at
    // its kernel, with no TLS error).
    let state = tempfile::tempdir().unwrap();
    let peer = |extra: &[&str]| {
        ferry()
            .env("FERRY_STATE", state.path())
            .env("FERRY_CACHE", state.path().join("cache"))
            .args([
                "peer",
                "--from",
                &format!("https://localhost:{}/", r.addr.port()),
            ])
            .args(["--net", "none", "--name", "t1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = peer(&[]);
    assert!(!out.status.success());
    let line = error_line(&out).to_lowercase();
    assert!(
        line.contains("certificate") || line.contains("issuer"),
        "{line}"
    );
    let out = peer(&["--ca", tls.join("ca.crt").to_str().unwrap()]);
    assert!(!out.status.success());
    let line = error_line(&out).to_lowercase();
    assert!(
        !line.contains("certificate") && !line.contains("issuer") && !line.contains("tls"),
        "{line}"
    );
    // Plain HTTP gets no HTTP answer from a TLS listener.
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let out = r.stop(libc::SIGTERM);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // Plain HTTP off loopback: refused without --insecure.
    let out = ferry()
        .args(["registry", "--package", a, "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(
        error_line(&out),
        "ferry: --listen 0.0.0.0:0: plain HTTP off loopback sends packages and the token in clear: pass --tls-cert FILE --tls-key FILE (see `ferry tls init`), or --insecure"
    );
}
