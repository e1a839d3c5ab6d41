//! Runs the real `ferry-web` binary on the host: one instance alone, a
//! fleet of three on loopback ports with fleet files pointing at each
//! other (and at a member that is gone), and members that never answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One running instance.
struct Web {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Web {
    /// Starts an instance whose files live in `dir`, on a free loopback port.
    fn start(dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-web"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--fleet-file")
            .arg(dir.join("fleet.json"))
            .arg("--storage-dir")
            .arg(dir.join("store"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("ferry-web did not say where it listens");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    fn url_addr(&self) -> String {
        self.addr.to_string()
    }

    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        http(self.addr, method, path, body)
    }

    /// A call whose answer is JSON.
    fn json(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        let (status, body) = self.call(method, path, body);
        let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        (status, value)
    }

    fn set_fleet(&self, self_name: &str, members: &[(&str, String)]) {
        let members: serde_json::Map<String, Value> = members
            .iter()
            .map(|(n, a)| (n.to_string(), json!(a)))
            .collect();
        let text = json!({"self": self_name, "members": members, "updated_unix": 1});
        // As the agent does: a temporary file renamed into place.
        let tmp = self.dir.join(".fleet.json.tmp");
        std::fs::write(&tmp, text.to_string()).unwrap();
        std::fs::rename(&tmp, self.dir.join("fleet.json")).unwrap();
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange; the status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n").into_bytes();
    if let Some(body) = body {
        raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        raw.extend_from_slice(body);
    } else {
        raw.extend_from_slice(b"\r\n");
    }
    let answer = exchange(addr, &raw);
    parse(&answer)
}

/// Sends raw bytes, reads the whole answer.
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    answer
}

fn parse(answer: &[u8]) -> (u16, Vec<u8>) {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(answer)));
    let head = String::from_utf8_lossy(&answer[..end]);
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, answer[end + 4..].to_vec())
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-web-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An address where nothing listens.
fn closed_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

#[test]
fn one_instance_serves_health_info_and_storage() {
    let dir = temp_dir("solo");
    let web = Web::start(&dir.join("solo"), &["--name", "solo"]);

    let (status, health) = web.json("GET", "/health", None);
    assert_eq!(
        (status, health),
        (200, json!({"status": "ok", "name": "solo"}))
    );

    let (status, info) = web.json("GET", "/info", None);
    assert_eq!(status, 200);
    assert_eq!(info["name"], "solo");
    assert!(info["hostname"].is_string(), "{info}");
    assert!(info["uptime_s"].as_f64().unwrap() > 0.0, "{info}");
    assert_eq!(info["boot_id"].as_str().unwrap().len(), 36, "{info}");
    assert_eq!(info["fleet"]["members"], json!({}));
    assert_eq!(info["storage_keys"], 0);

    // Storage: create, replace, read, count, delete.
    let (status, put) = web.json("POST", "/storage/greeting", Some(b"hello"));
    assert_eq!(
        (status, put),
        (201, json!({"key": "greeting", "bytes": 5, "created": true}))
    );
    let (status, put) = web.json("POST", "/storage/greeting", Some(b"hello again"));
    assert_eq!((status, put["created"].clone()), (200, json!(false)));
    assert_eq!(
        web.call("GET", "/storage/greeting", None),
        (200, b"hello again".to_vec())
    );
    let every_byte: Vec<u8> = (0..=255).collect();
    assert_eq!(web.call("POST", "/storage/bytes", Some(&every_byte)).0, 201);
    assert_eq!(web.call("GET", "/storage/bytes", None), (200, every_byte));
    assert_eq!(web.json("GET", "/info", None).1["storage_keys"], 2);
    let (status, deleted) = web.json("DELETE", "/storage/bytes", None);
    assert_eq!(
        (status, deleted),
        (200, json!({"key": "bytes", "deleted": true}))
    );
    let (status, missing) = web.json("GET", "/storage/bytes", None);
    assert_eq!(status, 404);
    assert_eq!(missing["error"], "no value stored under 'bytes'");
    assert_eq!(web.call("DELETE", "/storage/bytes", None).0, 404);
    assert!(dir.join("solo/store/greeting").is_file());

    // Bad input gets clear errors, and the service carries on.
    let (status, bad) = web.json("GET", "/storage/.secret", None);
    assert_eq!(status, 400);
    assert!(
        bad["error"].as_str().unwrap().contains("is not a key"),
        "{bad}"
    );
    assert_eq!(web.call("GET", "/storage/..%2Fetc", None).0, 400);
    assert_eq!(web.call("PUT", "/storage/greeting", Some(b"x")).0, 405);
    assert_eq!(web.call("POST", "/health", Some(b"")).0, 405);
    let (status, nope) = web.json("GET", "/nope", None);
    assert_eq!(status, 404);
    assert!(
        nope["error"].as_str().unwrap().contains("/health"),
        "{nope}"
    );
    let big = vec![b'x'; 1024 * 1024 + 1];
    assert_eq!(web.call("POST", "/storage/big", Some(&big)).0, 413);
    assert_eq!(parse(&exchange(web.addr, b"NONSENSE\r\n\r\n")).0, 400);
    assert_eq!(
        parse(&exchange(
            web.addr,
            b"POST /storage/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ))
        .0,
        501
    );
    // A client that connects and says nothing does not block others.
    let _idle = TcpStream::connect(web.addr).unwrap();
    assert_eq!(web.call("GET", "/health", None).0, 200);

    // The values are on disk: a new process over the same directory has them.
    drop(web);
    let web = Web::start(&dir.join("solo"), &["--name", "solo"]);
    assert_eq!(
        web.call("GET", "/storage/greeting", None),
        (200, b"hello again".to_vec())
    );

    // A taken port and a bad flag fail with their own exit codes.
    let taken = Command::new(env!("CARGO_BIN_EXE_ferry-web"))
        .args(["--listen", &web.url_addr(), "--storage-dir"])
        .arg(dir.join("other"))
        .output()
        .unwrap();
    assert_eq!(taken.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&taken.stderr).contains("cannot listen on"));
    let bad = Command::new(env!("CARGO_BIN_EXE_ferry-web"))
        .args(["--listen", "localhost:80"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    drop(web);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fleet_pings_broadcasts_and_reports_its_status() {
    let dir = temp_dir("fleet");
    let a = Web::start(&dir.join("a"), &[]);
    let b = Web::start(&dir.join("b"), &[]);
    let c = Web::start(&dir.join("c"), &[]);
    let ghost = closed_addr();
    let everyone = vec![
        ("a", a.url_addr()),
        ("b", b.url_addr()),
        ("c", c.url_addr()),
    ];
    let mut with_ghost = everyone.clone();
    with_ghost.push(("ghost", ghost.clone()));
    a.set_fleet("a", &with_ghost);
    b.set_fleet("b", &everyone);
    c.set_fleet("c", &everyone);

    // Names come from the fleet file, read on each request.
    for (web, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        assert_eq!(web.json("GET", "/health", None).1["name"], name);
    }
    let info = a.json("GET", "/info", None).1;
    assert_eq!(info["name"], "a");
    assert_eq!(info["fleet"]["members"]["ghost"], ghost.as_str());
    assert_eq!(info["fleet"]["members"].as_object().unwrap().len(), 4);

    // Ping: a live member, a dead one, an unknown one.
    let (status, ping) = a.json("GET", "/ping/b", None);
    assert_eq!(status, 200, "{ping}");
    assert_eq!(ping["vm"], "b");
    assert_eq!(ping["addr"], b.url_addr());
    assert_eq!(ping["answer"], json!({"status": "ok", "name": "b"}));
    assert!(ping["latency_ms"].as_f64().unwrap() > 0.0, "{ping}");
    let (status, ping) = a.json("GET", "/ping/ghost", None);
    assert_eq!(status, 502, "{ping}");
    assert!(
        ping["error"].as_str().unwrap().contains("cannot connect"),
        "{ping}"
    );
    let (status, ping) = a.json("GET", "/ping/nobody", None);
    assert_eq!(status, 404);
    assert_eq!(
        ping["error"],
        "no VM 'nobody' in the fleet (members: a, b, c, ghost)"
    );

    // Broadcast: stored everywhere but on the ghost, which is reported.
    let body = br#"{"key":"colour","value":"blue"}"#;
    let (status, cast) = a.json("POST", "/broadcast", Some(body));
    assert_eq!(status, 502, "{cast}");
    assert_eq!(
        (cast["stored"].clone(), cast["failed"].clone()),
        (json!(3), json!(1))
    );
    assert_eq!(cast["results"]["a"], json!({"ok": true, "local": true}));
    assert_eq!(cast["results"]["b"]["ok"], true);
    assert_eq!(cast["results"]["b"]["status"], 201);
    assert_eq!(cast["results"]["c"]["ok"], true);
    assert_eq!(cast["results"]["ghost"]["ok"], false);
    assert!(cast["results"]["ghost"]["error"].is_string(), "{cast}");
    for web in [&a, &b, &c] {
        assert_eq!(
            web.call("GET", "/storage/colour", None),
            (200, b"blue".to_vec())
        );
    }
    assert_eq!(
        a.call("POST", "/broadcast", Some(b"{\"key\":\"x\"}")).0,
        400
    );
    assert_eq!(
        a.call("POST", "/broadcast", Some(br#"{"key":"../x","value":"v"}"#))
            .0,
        400
    );

    // Cluster status from a: the ghost is down, the rest answer as themselves.
    let (status, cluster) = a.json("GET", "/cluster-status", None);
    assert_eq!(status, 200);
    assert_eq!(cluster["self"]["name"], "a");
    assert_eq!(cluster["self"]["storage_keys"], 1);
    assert_eq!(
        (cluster["reachable"].clone(), cluster["total"].clone()),
        (json!(3), json!(4))
    );
    let members = cluster["members"].as_array().unwrap();
    let member = |name: &str| members.iter().find(|m| m["name"] == name).unwrap().clone();
    assert_eq!(member("b")["reachable"], true);
    assert_eq!(member("b")["health_name"], "b");
    assert!(member("c")["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(member("ghost")["reachable"], false);
    assert_eq!(member("ghost")["latency_ms"], Value::Null);
    assert!(member("ghost")["error"].is_string());

    // A new fleet file takes effect on the next request.
    a.set_fleet("a", &everyone);
    let (status, cast) = a.json(
        "POST",
        "/broadcast",
        Some(br#"{"key":"colour","value":"green"}"#),
    );
    assert_eq!(status, 200, "{cast}");
    assert_eq!(cast["failed"], 0);
    assert_eq!(c.call("GET", "/storage/colour", None).1, b"green");
    let cluster = b.json("GET", "/cluster-status", None).1;
    assert_eq!(
        (cluster["reachable"].clone(), cluster["total"].clone()),
        (json!(3), json!(3))
    );
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn calls_to_members_that_do_not_answer_time_out() {
    let dir = temp_dir("silent");
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    // Answers with something that is not HTTP.
    let babbler = TcpListener::bind("127.0.0.1:0").unwrap();
    let babbler_addr = babbler.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut s in babbler.incoming().map_while(Result::ok) {
            let mut request = [0u8; 4096];
            let _ = s.read(&mut request);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        }
    });
    let web = Web::start(&dir.join("a"), &["--timeout-ms", "500"]);
    web.set_fleet(
        "a",
        &[
            ("silent", silent_addr),
            ("babbler", babbler_addr),
            ("named", "web-2:8000".to_string()),
        ],
    );

    let started = Instant::now();
    let (status, ping) = web.json("GET", "/ping/silent", None);
    assert_eq!(status, 502, "{ping}");
    assert!(
        ping["error"]
            .as_str()
            .unwrap()
            .contains("did not answer within 500 ms"),
        "{ping}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let (status, ping) = web.json("GET", "/ping/babbler", None);
    assert_eq!(status, 502);
    assert!(
        ping["error"].as_str().unwrap().contains("not HTTP"),
        "{ping}"
    );
    let (status, ping) = web.json("GET", "/ping/named", None);
    assert_eq!(status, 502);
    assert!(
        ping["error"]
            .as_str()
            .unwrap()
            .contains("not a numeric IP:PORT"),
        "{ping}"
    );

    // The members are probed side by side: about one timeout in all.
    let started = Instant::now();
    let (status, cluster) = web.json("GET", "/cluster-status", None);
    assert_eq!(status, 200);
    assert_eq!(cluster["reachable"], 0);
    assert_eq!(cluster["total"], 3);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let (status, cast) = web.json("POST", "/broadcast", Some(br#"{"key":"k","value":"v"}"#));
    assert_eq!(status, 502);
    assert_eq!(cast["results"]["a"]["ok"], true, "{cast}");
    assert_eq!(cast["failed"], 3);
    drop(web);
    let _ = std::fs::remove_dir_all(&dir);
}
