//! Helpers for the lazy disk tests: a disk image with a pattern anyone can
//! check, a real package of it, a real registry (or a static server) on
//! loopback, a lazy disk and its NBD server, and QEMU's own tools as the
//! NBD client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

use ferry_lazydisk::{LazyDisk, LazyDiskOptions, NbdServer, RemoteSection};
use ferry_package::{PackageWriter, SectionKind, VmMeta, DEFAULT_CHUNK_SIZE};
use ferry_transport::{Registry, RegistryConfig, RemotePackage, RunningRegistry};

/// Chunk size of the test disks: the package default.
pub const CHUNK: u64 = DEFAULT_CHUNK_SIZE;
/// The image is made of blocks of this size.
pub const BLOCK: usize = 64 << 10;
/// 8 full chunks and a short last one of 3 blocks.
pub const BLOCKS: usize = 8 * (CHUNK as usize / BLOCK) + 3;
/// The disk's size.
pub const SIZE: u64 = (BLOCKS * BLOCK) as u64;
/// A chunk of zeros (not stored in the package).
pub const ZERO_CHUNK: usize = 3;

/// The byte that fills block `i` when the block is a constant one.
pub fn pattern(i: usize) -> u8 {
    (i % 251 + 1) as u8
}

/// What block `i` holds: zeros (all of chunk 3, and blocks 200..204 inside
/// chunk 6), the constant `pattern(i)` for even blocks, and incompressible
/// bytes for odd ones (so that a chunk's transfer costs about its size).
pub fn block(i: usize) -> Vec<u8> {
    let per_chunk = CHUNK as usize / BLOCK;
    if i / per_chunk == ZERO_CHUNK || (200..204).contains(&i) {
        vec![0; BLOCK]
    } else if i.is_multiple_of(2) {
        vec![pattern(i); BLOCK]
    } else {
        random_bytes(i as u64, BLOCK)
    }
}

/// The whole test disk image.
pub fn image() -> Vec<u8> {
    (0..BLOCKS).flat_map(block).collect()
}

/// `n` pseudo-random bytes (xorshift64*).
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
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

/// The metadata of a small VM package (every package carries one).
pub fn vm_meta() -> VmMeta {
    let meta = serde_json::json!({
        "ferry_version": "0.0.0-test", "written_unix": 0, "generation": 0,
        "provenance": {
            "engine": "test", "engine_version": "1", "cpu_model": "max",
            "accel": "tcg", "memory_mib": 64, "cpus": 1
        },
        "recipe": "lazydisk", "cmdline": "",
        "network": {
            "interface": "eth0", "guest_address": "172.100.100.2",
            "prefix_len": 30, "gateway": "172.100.100.1"
        },
        "liveness": {"kind": "none"}
    });
    VmMeta::from_json(&meta, "test").unwrap()
}

/// Writes `dir/name`: a package with a config and the disk `image`.
pub fn make_package(dir: &Path, name: &str, image: &[u8]) -> PathBuf {
    let raw = dir.join(format!(".{name}.disk"));
    std::fs::write(&raw, image).unwrap();
    let dest = dir.join(name);
    let mut w = PackageWriter::create(&dest).unwrap();
    w.add_bytes(SectionKind::Config, br#"{"vcpus":1,"memory_mib":64}"#)
        .unwrap();
    w.add_file(SectionKind::Disk, &raw, CHUNK, None, &mut |_, _| {})
        .unwrap();
    w.commit(&vm_meta()).unwrap();
    std::fs::remove_file(raw).unwrap();
    dest
}

/// Serves `package` with a ferry registry on a free loopback port.
pub fn registry(package: &Path) -> RunningRegistry {
    Registry::bind(RegistryConfig {
        packages: vec![package.to_path_buf()],
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
    })
    .unwrap()
    .spawn()
    .unwrap()
}

/// A package served, a lazy disk on it, and the disk served over NBD.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub image: Vec<u8>,
    pub package: PathBuf,
    pub remote: Arc<RemotePackage>,
    pub disk: Arc<LazyDisk>,
    pub nbd: NbdServer,
    /// Keeps the registry (or static server) running; dropped last.
    pub server: ServerGuard,
}

/// Whatever serves the package.
pub enum ServerGuard {
    Registry(RunningRegistry),
    Static(StaticServer),
}

impl Fixture {
    /// The standard image served by a ferry registry; background prefetch
    /// on or off.
    pub fn new(prefetch: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let package = make_package(dir.path(), "vm.ferry", &image);
        let reg = registry(&package);
        let url = reg.url();
        Fixture::with_url(
            dir,
            image,
            package,
            &url,
            ServerGuard::Registry(reg),
            prefetch,
        )
    }

    /// A lazy disk on the package at `url`, served over NBD in `dir`.
    pub fn with_url(
        dir: tempfile::TempDir,
        image: Vec<u8>,
        package: PathBuf,
        url: &str,
        server: ServerGuard,
        prefetch: bool,
    ) -> Fixture {
        let remote = Arc::new(RemotePackage::open(url, None).unwrap());
        let source = RemoteSection::new(remote.clone(), SectionKind::Disk).unwrap();
        let disk = Arc::new(
            LazyDisk::open(
                &dir.path().join("disk.raw"),
                source,
                LazyDiskOptions {
                    prefetch,
                    ..LazyDiskOptions::default()
                },
            )
            .unwrap(),
        );
        let nbd = NbdServer::serve(&dir.path().join("disk.nbd"), disk.clone()).unwrap();
        Fixture {
            dir,
            image,
            package,
            remote,
            disk,
            nbd,
            server,
        }
    }

    /// `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        self.nbd.uri()
    }

    /// The stored (compressed) size of disk chunk `index` in the package.
    pub fn stored_len(&self, index: usize) -> u64 {
        self.remote.section(SectionKind::Disk).unwrap().chunks[index]
            .as_ref()
            .map_or(0, |c| c.stored_len)
    }
}

/// Runs `qemu-io -f raw` with `commands` on `uri`.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    run(cmd)
}

/// Runs `qemu-img` with `args`.
pub fn qemu_img(args: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    run(cmd)
}

fn run(mut cmd: Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not run ({e}): install qemu-utils"));
    eprintln!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// stdout and stderr of `out`, as one string.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that qemu-io ran every command without error.
pub fn assert_ok(out: &Output) {
    let t = text(out);
    assert!(out.status.success(), "qemu-io failed: {t}");
    for bad in ["failed", "error", "Error"] {
        assert!(!t.contains(bad), "qemu-io reported a failure: {t}");
    }
}

/// A static file server that honours Range (ferry-transport's test
/// helper `range_server.py`), killed when dropped.
pub struct StaticServer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StaticServer {
    /// Serves `dir`, sleeping `throttle` seconds per 64 KiB sent.
    pub fn start(dir: &Path, throttle: f64) -> StaticServer {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferry-transport/tests/range_server.py");
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
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no port in {line:?}"));
        StaticServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// `http://ADDR/` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// Kills the server now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flips a bit of the byte at `offset` of `path`.
pub fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}
