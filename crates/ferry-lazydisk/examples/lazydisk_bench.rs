//! Measures a lazy disk over loopback: a package of a generated disk image
//! (half incompressible, an eighth zeros) served by a ferry registry, a
//! lazy disk on it, exported over NBD, read by qemu-io and qemu-img.
//!
//! ```sh
//! cargo run --release -p ferry-lazydisk --example lazydisk_bench -- [SIZE_MIB]
//! ```
//!
//! Prints, each beside its floor:
//! - the first 64 KiB read by a fresh qemu-io from a fresh lazy disk, vs the
//!   same read from the raw image file;
//! - `qemu-img convert` of the whole disk with every chunk fetched on
//!   demand, vs fetching every chunk with `RemotePackage` alone, vs
//!   converting the raw image file;
//! - background prefetch of the whole disk with no client;
//! - `qemu-img convert` once every chunk is present (NBD cost alone).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_lazydisk::{LazyDisk, LazyDiskOptions, NbdServer, RemoteSection};
use ferry_package::{PackageWriter, SectionKind, VmMeta, DEFAULT_CHUNK_SIZE};
use ferry_transport::{Registry, RegistryConfig, RemotePackage};

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("SIZE_MIB is a number"))
        .unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("image.raw");
    std::fs::write(&raw, image(mib << 20)).unwrap();
    let package = dir.path().join("vm.ferry");
    let mut w = PackageWriter::create(&package).unwrap();
    w.add_bytes(SectionKind::Config, b"{}").unwrap();
    w.add_file(
        SectionKind::Disk,
        &raw,
        DEFAULT_CHUNK_SIZE,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    w.commit(&vm_meta()).unwrap();
    let registry = Registry::bind(RegistryConfig {
        packages: vec![package.clone()],
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
    })
    .unwrap()
    .spawn()
    .unwrap();
    let url = registry.url();
    let size = mib << 20;
    println!(
        "disk {mib} MiB in chunks of {} MiB, package {:.1} MiB, registry on loopback",
        DEFAULT_CHUNK_SIZE >> 20,
        std::fs::metadata(&package).unwrap().len() as f64 / (1 << 20) as f64
    );

    // First read.
    let local = time(|| qemu_io(&raw.to_string_lossy(), "read 0 64k"));
    let lazy = Lazy::start(dir.path(), "first", &url, false);
    let (first, _) = time(|| qemu_io(&lazy.nbd.uri(), "read 0 64k"));
    let open_and_first = lazy.opened + first;
    println!(
        "first 64 KiB read: {} ms from opening the package (open {} ms: package {}, lazy disk {}, NBD {}; qemu-io {} ms); qemu-io on the raw file: {} ms",
        ms(open_and_first),
        ms(lazy.opened),
        ms(lazy.steps[0]),
        ms(lazy.steps[1]),
        ms(lazy.steps[2]),
        ms(first),
        ms(local.0)
    );
    drop(lazy);

    // Whole disk, on demand.
    let out = dir.path().join("out.raw");
    let floor = {
        let remote = RemotePackage::open(&url, None).unwrap();
        let count = remote.section(SectionKind::Disk).unwrap().chunk_count();
        time(|| {
            for i in 0..count {
                remote.read_chunk(SectionKind::Disk, i).unwrap();
            }
        })
        .0
    };
    let (local_convert, _) = time(|| qemu_img_convert(&raw.to_string_lossy(), &out));
    let lazy = Lazy::start(dir.path(), "convert", &url, false);
    let (convert, _) = time(|| qemu_img_convert(&lazy.nbd.uri(), &out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    println!(
        "qemu-img convert, all on demand: {} ms, {:.0} MiB/s; RemotePackage alone: {} ms, {:.0} MiB/s; raw file: {} ms, {:.0} MiB/s",
        ms(convert),
        rate(size, convert),
        ms(floor),
        rate(size, floor),
        ms(local_convert),
        rate(size, local_convert)
    );
    // Every chunk present: NBD alone.
    let (present, _) = time(|| qemu_img_convert(&lazy.nbd.uri(), &out));
    println!(
        "qemu-img convert, every chunk present: {} ms, {:.0} MiB/s",
        ms(present),
        rate(size, present)
    );
    drop(lazy);

    // On demand and in the background at once (what a resumed VM sees).
    let lazy = Lazy::start(dir.path(), "both", &url, true);
    let (both, _) = time(|| qemu_img_convert(&lazy.nbd.uri(), &out));
    println!(
        "qemu-img convert while prefetching: {} ms, {:.0} MiB/s",
        ms(both),
        rate(size, both)
    );
    drop(lazy);

    // Background prefetch alone.
    let lazy = Lazy::start(dir.path(), "prefetch", &url, true);
    let (prefetch, done) = time(|| lazy.disk.wait_complete(Duration::from_secs(600)));
    assert!(done);
    println!(
        "prefetch of the whole disk (2 threads): {} ms, {:.0} MiB/s",
        ms(prefetch),
        rate(size, prefetch)
    );
}

struct Lazy {
    disk: Arc<LazyDisk>,
    nbd: NbdServer,
    opened: Duration,
    /// RemotePackage::open, LazyDisk::open, NbdServer::serve.
    steps: [Duration; 3],
}

impl Lazy {
    fn start(dir: &Path, name: &str, url: &str, prefetch: bool) -> Lazy {
        let started = Instant::now();
        let remote = Arc::new(RemotePackage::open(url, None).unwrap());
        let t1 = started.elapsed();
        let source = RemoteSection::new(remote, SectionKind::Disk).unwrap();
        let disk = Arc::new(
            LazyDisk::open(
                &dir.join(format!("{name}.raw")),
                source,
                LazyDiskOptions {
                    prefetch,
                    ..LazyDiskOptions::default()
                },
            )
            .unwrap(),
        );
        let t2 = started.elapsed();
        let nbd = NbdServer::serve(&dir.join(format!("{name}.nbd")), disk.clone()).unwrap();
        let opened = started.elapsed();
        Lazy {
            disk,
            nbd,
            opened,
            steps: [t1, t2 - t1, opened - t2],
        }
    }
}

/// Blocks of 64 KiB: every eighth zero, every other random, the rest text.
fn image(size: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::with_capacity(size as usize);
    for block in 0..size / 65536 {
        match block % 8 {
            0 => out.resize(out.len() + 65536, 0),
            k if k % 2 == 1 => {
                for _ in 0..65536 / 8 {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
                }
            }
            _ => out.extend(b"ferry lazy disk ".iter().cycle().take(65536)),
        }
    }
    out
}

fn qemu_io(file: &str, command: &str) {
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, file])
        .output()
        .expect("qemu-io runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn qemu_img_convert(from: &str, to: &Path) {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", from])
        .arg(to)
        .output()
        .expect("qemu-img runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let started = Instant::now();
    let r = f();
    (started.elapsed(), r)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1 << 20) as f64
}

/// The metadata of a small VM package (every package carries one).
fn vm_meta() -> VmMeta {
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
