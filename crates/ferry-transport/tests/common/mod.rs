//! Helpers for the transport tests: small real packages, a registry or a
//! static server on loopback, and raw HTTP/1.1 requests so the server is
//! checked byte for byte, not through the client under test.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_package::{PackageWriter, SectionKind, VmMeta};
use ferry_transport::{Registry, RegistryConfig, RunningRegistry};

/// Chunk size of the memory section of test packages.
pub const CHUNK: u64 = 64 << 10;

/// `n` pseudo-random (incompressible) bytes.
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    // xorshift64*: enough to defeat zstd.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A memory image of random, zero and compressible chunks, the last short.
pub fn memory_image(seed: u64) -> Vec<u8> {
    let c = CHUNK as usize;
    let mut v = Vec::new();
    v.extend(random_bytes(seed, c));
    v.extend(vec![0u8; 2 * c]);
    v.extend(
        b"the ferry crosses the river; "
            .iter()
            .copied()
            .cycle()
            .take(c),
    );
    v.extend(random_bytes(seed + 1, c / 2 + 123));
    v
}

/// The metadata of a small VM package whose recipe is `recipe`, as the
/// JSON a ferry writes.
pub fn vm_meta_json(recipe: &str) -> serde_json::Value {
    serde_json::json!({
        "ferry_version": "0.0.0-test",
        "written_unix": 1_700_000_000u64,
        "generation": 0,
        "provenance": {
            "engine": "test", "engine_version": "1", "cpu_model": "max",
            "accel": "tcg", "memory_mib": 64, "cpus": 1
        },
        "recipe": recipe,
        "cmdline": "console=ttyS0",
        "network": {
            "interface": "eth0", "guest_address": "172.100.100.2",
            "prefix_len": 30, "gateway": "172.100.100.1"
        },
        "liveness": {"kind": "none"}
    })
}

/// [`vm_meta_json`] as a [`VmMeta`].
pub fn vm_meta(recipe: &str) -> VmMeta {
    VmMeta::from_json(&vm_meta_json(recipe), "test").unwrap()
}

/// Writes a package `dir/name` with config, memory and kernel sections.
pub fn make_package(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let mem = dir.join(format!(".{name}.mem"));
    std::fs::write(&mem, memory_image(seed)).unwrap();
    let dest = dir.join(name);
    let mut w = PackageWriter::create(&dest).unwrap();
    w.add_bytes(SectionKind::Config, br#"{"vcpus":1,"memory_mib":4}"#)
        .unwrap();
    w.add_file(SectionKind::Memory, &mem, CHUNK, None, &mut |_, _| {})
        .unwrap();
    w.add_bytes(SectionKind::Kernel, &random_bytes(seed + 7, 5000))
        .unwrap();
    w.commit(&vm_meta(name)).unwrap();
    std::fs::remove_file(mem).unwrap();
    dest
}

/// Writes a package `dir/name` whose disk section is one raw chunk of
/// `size` random bytes: a transfer long enough to interrupt.
pub fn make_big_package(dir: &Path, name: &str, size: usize) -> PathBuf {
    let disk = dir.join(format!(".{name}.disk"));
    std::fs::write(&disk, random_bytes(99, size)).unwrap();
    let dest = dir.join(name);
    let mut w = PackageWriter::create(&dest).unwrap();
    w.add_bytes(SectionKind::Config, b"{}").unwrap();
    w.add_file(SectionKind::Disk, &disk, size as u64, None, &mut |_, _| {})
        .unwrap();
    w.commit(&vm_meta(name)).unwrap();
    std::fs::remove_file(disk).unwrap();
    dest
}

/// Replaces the metadata in the table of the package at `path` by
/// `metadata` (as another writer would have stored it), fixing up the
/// header's table length and checksums.
pub fn set_metadata(path: &Path, metadata: serde_json::Value) {
    use sha2::{Digest, Sha256};
    let mut bytes = std::fs::read(path).unwrap();
    let off = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let mut table: serde_json::Value = serde_json::from_slice(&bytes[off..]).unwrap();
    table["metadata"] = metadata;
    let json = serde_json::to_vec(&table).unwrap();
    bytes.truncate(off);
    bytes.extend_from_slice(&json);
    bytes[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
    bytes[32..64].copy_from_slice(&Sha256::digest(&json));
    let sum = Sha256::digest(&bytes[..64]);
    bytes[64..96].copy_from_slice(&sum);
    std::fs::write(path, bytes).unwrap();
}

/// Serves `packages` on a free loopback port.
pub fn serve(packages: &[&Path], token: Option<&str>) -> RunningRegistry {
    Registry::bind(RegistryConfig {
        packages: packages.iter().map(|p| p.to_path_buf()).collect(),
        listen: "127.0.0.1:0".parse().unwrap(),
        token: token.map(|t| ferry_transport::Token::new(t).unwrap()),
    })
    .unwrap()
    .spawn()
    .unwrap()
}

/// An HTTP response as read off the socket.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    /// The value of header `name` (case-insensitive), if present once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut found = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "header {name} appears twice");
        first
    }
}

/// Sends `METHOD path` with `headers` over a new connection
/// (`Connection: close`) and reads the whole answer.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Raw {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').expect("header line");
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body).unwrap();
    Raw {
        status,
        headers,
        body,
    }
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> Raw {
    request(addr, "GET", path, &[])
}

/// A child process killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `http://ADDR/` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }
}

/// `python3 -m http.server` serving `dir` on a free port.
pub fn python_http_server(dir: &Path) -> Server {
    let mut child = Command::new("python3")
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1"])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    let line = first_line(&mut child);
    let port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

/// `tests/range_server.py` (a static server that honours Range) serving
/// `dir` on a free port, sleeping `throttle` seconds per 64 KiB sent.
pub fn range_server(dir: &Path, throttle: f64) -> Server {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/range_server.py");
    let mut child = Command::new("python3")
        .arg("-u")
        .arg(script)
        .arg(dir)
        .arg("--throttle")
        .arg(throttle.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    let line = first_line(&mut child);
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no port in {line:?}"));
    Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn first_line(child: &mut Child) -> String {
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("server prints its port");
    line
}

/// Flips one bit of the byte at `offset` of `path`.
pub fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}
