//! Runs the real `ferry-agent` binary on the host (not as PID 1), talking to
//! it over a Unix socket the test listens on, as the host's engine would over
//! the virtio-serial port.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent_proto::{
    b64_decode, decode, encode, Decoder, FleetFile, FleetMember, Frame, Reply, Request,
    PROTOCOL_MINOR, PROTOCOL_VERSION,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One agent process and the test's end of its port.
struct Harness {
    dir: PathBuf,
    agent: Child,
    conn: UnixStream,
    decoder: Decoder,
    /// Frames read but not yet asked for.
    pending: VecDeque<Frame<Reply>>,
}

impl Harness {
    /// Starts the agent with `config` (JSON text, `{dir}` replaced by the
    /// test's directory) and accepts its connection.
    fn start(tag: &str, config: Option<&str>) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-agent-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("agent.json");
        if let Some(config) = config {
            std::fs::write(&config_path, config.replace("{dir}", dir.to_str().unwrap())).unwrap();
        }
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let agent = Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .arg("--config")
            .arg(&config_path)
            .arg("--port")
            .arg(&socket)
            .arg("--fleet-file")
            .arg(dir.join("run/ferry/fleet.json"))
            .arg("--debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("the agent did not connect: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        Self {
            dir,
            agent,
            conn,
            decoder: Decoder::new(),
            pending: VecDeque::new(),
        }
    }

    fn send(&mut self, id: u64, request: &Request) {
        self.conn.write_all(&encode(id, request)).unwrap();
    }

    fn send_raw(&mut self, line: &[u8]) {
        self.conn.write_all(line).unwrap();
    }

    /// The next frame from the agent, in arrival order.
    fn next(&mut self) -> Frame<Reply> {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 65536];
        while self.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no frame from the agent within {TIMEOUT:?}"
            );
            self.conn.set_read_timeout(Some(left)).unwrap();
            let n = match self.conn.read(&mut buf) {
                Ok(0) => panic!("the agent closed the port"),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) => panic!("reading from the agent: {e}"),
            };
            for line in self.decoder.push(&buf[..n]) {
                let frame: Frame<Reply> = decode(&line).expect("the agent sent a bad frame");
                self.pending.push_back(frame);
            }
        }
        self.pending.pop_front().unwrap()
    }

    /// The reply to request `id`, skipping events.
    fn reply(&mut self, id: u64) -> Reply {
        loop {
            let frame = self.next();
            if frame.id == id {
                return frame.body;
            }
            assert_eq!(frame.id, 0, "unexpected reply {:?}", frame.body);
        }
    }

    fn exec(
        &mut self,
        id: u64,
        argv: &[&str],
        timeout_ms: Option<u64>,
    ) -> (i32, String, String, bool) {
        self.send(
            id,
            &Request::Exec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                stdin_b64: None,
                timeout_ms,
            },
        );
        match self.reply(id) {
            Reply::ExecResult {
                exit_code,
                stdout_b64,
                stderr_b64,
                timed_out,
                ..
            } => (
                exit_code,
                String::from_utf8(b64_decode(&stdout_b64).unwrap()).unwrap(),
                String::from_utf8(b64_decode(&stderr_b64).unwrap()).unwrap(),
                timed_out,
            ),
            other => panic!("expected exec-result, got {other:?}"),
        }
    }

    /// Waits for the agent to exit; `None` if it does not within the timeout.
    fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.agent.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            eprintln!("--- agent log ---\n{log}--- end ---");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const CONFIG: &str = r#"{
    "service": ["sh", "-c", "echo $$ > {dir}/service.pid; exec sleep 60"],
    "env": [["FERRY_TEST", "yes"]],
    "liveness": {"kind": "exec", "argv": ["true"]}
}"#;

#[test]
fn hello_live_exec_and_shutdown() {
    let mut h = Harness::start("story", Some(CONFIG));

    h.send(
        1,
        &Request::Hello {
            host_version: "test".into(),
        },
    );
    let mut saw_hello = false;
    let mut saw_live = false;
    while !(saw_hello && saw_live) {
        let frame = h.next();
        match (frame.id, frame.body) {
            (
                1,
                Reply::Hello {
                    protocol_version,
                    protocol_minor,
                    agent_version,
                    ..
                },
            ) => {
                assert_eq!(protocol_version, PROTOCOL_VERSION);
                assert_eq!(protocol_minor, PROTOCOL_MINOR);
                assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
                saw_hello = true;
            }
            (0, Reply::Live { uptime_ms }) => {
                assert!(uptime_ms > 0);
                saw_live = true;
            }
            (id, body) => panic!("unexpected frame {id}: {body:?}"),
        }
    }
    h.send(2, &Request::Status);
    match h.reply(2) {
        Reply::Status(status) => {
            assert!(status.live);
            assert!(!status.hostname.is_empty());
            assert_eq!(status.service_exit, None);
        }
        other => panic!("expected status, got {other:?}"),
    }

    let (code, out, err, timed_out) =
        h.exec(3, &["sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!(
        (code, out.as_str(), err.as_str(), timed_out),
        (3, "out\n", "err\n", false)
    );

    // The configured environment and PATH reach exec'd commands.
    let (code, out, _, _) = h.exec(4, &["sh", "-c", "echo $FERRY_TEST:$PATH"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("yes:/usr/local/sbin:"), "{out}");
    assert!(out.trim_end().ends_with(":/ferry/bin"), "{out}");

    let started = Instant::now();
    let (code, _, _, timed_out) = h.exec(5, &["sleep", "5"], Some(200));
    assert!(timed_out);
    assert_eq!(code, 128 + 9);
    assert!(started.elapsed() < Duration::from_secs(3));

    let (code, _, err, _) = h.exec(6, &["ferry-no-such-program"], None);
    assert_eq!(code, 127);
    assert!(err.contains("cannot run 'ferry-no-such-program'"), "{err}");

    h.send(
        7,
        &Request::Exec {
            argv: vec![],
            stdin_b64: None,
            timeout_ms: None,
        },
    );
    assert!(matches!(h.reply(7), Reply::Error { .. }));

    h.send(
        8,
        &Request::Exec {
            argv: vec!["cat".into()],
            stdin_b64: Some(ferry_agent_proto::b64_encode(b"fed")),
            timeout_ms: Some(5000),
        },
    );
    match h.reply(8) {
        Reply::ExecResult {
            exit_code: 0,
            stdout_b64,
            ..
        } => {
            assert_eq!(b64_decode(&stdout_b64).unwrap(), b"fed");
        }
        other => panic!("expected exec-result, got {other:?}"),
    }

    let service_pid: i32 = wait_for_file(&h.path("service.pid"))
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{service_pid}")).exists());

    h.send(9, &Request::Shutdown);
    assert_eq!(h.reply(9), Reply::ShuttingDown);
    let status = h
        .wait_exit()
        .expect("the agent did not exit after shutdown");
    assert!(status.success(), "agent exited with {status}");
    assert!(
        !Path::new(&format!("/proc/{service_pid}")).exists(),
        "the service (pid {service_pid}) outlived the agent"
    );
}

#[test]
fn status_is_answered_while_an_exec_runs() {
    let mut h = Harness::start("concurrent", Some(CONFIG));
    h.send(
        1,
        &Request::Exec {
            argv: vec!["sleep".into(), "1".into()],
            stdin_b64: None,
            timeout_ms: None,
        },
    );
    // Give the exec a head start so that it is really running.
    std::thread::sleep(Duration::from_millis(100));
    h.send(2, &Request::Status);
    let mut order = Vec::new();
    while order.len() < 2 {
        let frame = h.next();
        if frame.id != 0 {
            order.push(frame.id);
        }
    }
    assert_eq!(order, vec![2, 1]);
}

#[test]
fn bad_frames_get_errors_or_are_ignored() {
    let mut h = Harness::start("bad-frames", Some(CONFIG));
    // Noise, then a partial line completed by the next write: ignored.
    h.send_raw(b"garbage\n{\"v\":1,");
    h.send_raw(b"\"id\":\n");
    // Another protocol version: an error with the frame's id.
    h.send_raw(br#"{"v":99,"id":5,"body":{"type":"status"}}"#);
    h.send_raw(b"\n");
    match h.reply(5) {
        Reply::Error { message } => assert!(message.contains("99"), "{message}"),
        other => panic!("expected error, got {other:?}"),
    }
    // Our version but an unknown request: an error, not silence.
    h.send_raw(b"{\"v\":1,\"id\":6,\"body\":{\"type\":\"teleport\"}}\n");
    assert!(matches!(h.reply(6), Reply::Error { .. }));
    // The stream is still in sync.
    h.send(7, &Request::Status);
    assert!(matches!(h.reply(7), Reply::Status(_)));
}

#[test]
fn missing_config_still_answers_but_is_never_live() {
    let mut h = Harness::start("no-config", None);
    h.send(
        1,
        &Request::Hello {
            host_version: "test".into(),
        },
    );
    match h.reply(1) {
        Reply::Hello { status, .. } => assert!(!status.live),
        other => panic!("expected hello, got {other:?}"),
    }
    let (code, out, _, _) = h.exec(2, &["echo", "debug me"], None);
    assert_eq!((code, out.as_str()), (0, "debug me\n"));
}

#[test]
fn service_exit_is_reported() {
    let config = r#"{"service": ["sh", "-c", "exit 7"], "liveness": {"kind": "none"}}"#;
    let mut h = Harness::start("service-exit", Some(config));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let frame = h.next();
        if let (0, Reply::Status(status)) = (frame.id, &frame.body) {
            assert_eq!(status.service_exit, Some(7));
            break;
        }
        assert!(Instant::now() < deadline);
    }
    h.send(1, &Request::Status);
    match h.reply(1) {
        Reply::Status(status) => assert_eq!(status.service_exit, Some(7)),
        other => panic!("expected status, got {other:?}"),
    }
}

#[test]
fn set_fleet_writes_the_fleet_file() {
    let mut h = Harness::start("fleet", Some(CONFIG));
    let fleet_path = h.path("run/ferry/fleet.json");
    let member = |name: &str, port: u16| FleetMember {
        name: name.into(),
        addr: format!("172.100.100.1:{port}"),
    };
    h.send(
        1,
        &Request::SetFleet {
            self_name: "w1".into(),
            members: vec![member("w1", 18001), member("w2", 18002)],
        },
    );
    assert_eq!(h.reply(1), Reply::FleetSet);
    let text = std::fs::read_to_string(&fleet_path).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["self"], "w1");
    assert_eq!(
        value["members"],
        serde_json::json!({"w1": "172.100.100.1:18001", "w2": "172.100.100.1:18002"})
    );
    let updated = value["updated_unix"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(updated <= now && now - updated < 60, "{updated} vs {now}");

    // A new list replaces the old one whole.
    h.send(
        2,
        &Request::SetFleet {
            self_name: "w1".into(),
            members: vec![member("w3", 18003)],
        },
    );
    assert_eq!(h.reply(2), Reply::FleetSet);
    let file: FleetFile =
        serde_json::from_str(&std::fs::read_to_string(&fleet_path).unwrap()).unwrap();
    assert_eq!(file.self_name, "w1");
    assert_eq!(
        file.members.keys().collect::<Vec<_>>(),
        vec![&"w3".to_string()]
    );

    // A bad list is refused and leaves the file as it was.
    let before = std::fs::read(&fleet_path).unwrap();
    h.send(
        3,
        &Request::SetFleet {
            self_name: "w1".into(),
            members: vec![FleetMember {
                name: "w2".into(),
                addr: "web-2:8000".into(),
            }],
        },
    );
    match h.reply(3) {
        Reply::Error { message } => assert!(message.contains("web-2:8000"), "{message}"),
        other => panic!("expected error, got {other:?}"),
    }
    assert_eq!(std::fs::read(&fleet_path).unwrap(), before);
    // Nothing but the file is left beside it (no temporary files).
    let names: Vec<_> = std::fs::read_dir(fleet_path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("fleet.json")]);
}
