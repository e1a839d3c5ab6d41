//! The seed inputs of every fuzz target, made the way ferry itself makes
//! them: a package written by `PackageWriter`, agent frames by
//! `ferry_agent_proto::encode`, migration messages serialised from their
//! types, an NBD session as QEMU's client opens one. `write_seeds` (an
//! ignored test) writes them to `fuzz/corpus/<target>/ok-<name>`.

use std::path::Path;

use ferry_agent_proto::shell::{Kind, ShellFrame};
use ferry_agent_proto::{encode, GuestStatus, Reply, Request};
use ferry_engine::LiveStats;
use ferry_package::{Package, PackageIndex, PackageWriter, SectionKind, VmMeta};
use ferry_transport::migration::{ChannelKind, DestMsg, Hello, SourceMsg, VmOffer};

/// One seed: its target, its name (without `ok-`) and its bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: &str, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed {
        target,
        name: name.to_string(),
        bytes: bytes.into(),
    }
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = packages();
    seeds.extend(agent());
    seeds.extend(migration());
    seeds.extend(nbd());
    seeds.extend(http_range());
    seeds
}

pub fn meta_json() -> serde_json::Value {
    serde_json::json!({
        "ferry_version": "0.1.0",
        "written_unix": 1700000000u64,
        "generation": 2,
        "provenance": {
            "engine": "qemu", "engine_version": "10.0.2", "cpu_model": "max",
            "accel": "tcg", "memory_mib": 256, "cpus": 1
        },
        "recipe": "redis",
        "cmdline": "console=ttyS0 panic=-1 quiet",
        "network": {
            "interface": "eth0", "guest_address": "172.100.100.2",
            "prefix_len": 30, "gateway": "172.100.100.1"
        },
        "liveness": {"kind": "tcp", "port": 6379}
    })
}

/// A small real package (config, device state, a memory section of
/// 4 KiB chunks with a zero, a compressible and an incompressible one),
/// whole and as its table.
fn packages() -> Vec<Seed> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.ferry");
    let mem_path = dir.path().join("mem.raw");
    let mut mem = vec![0u8; 4096];
    mem.extend(std::iter::repeat_n(b'r', 4096));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    mem.extend((0..2048).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    std::fs::write(&mem_path, &mem).unwrap();
    let meta: VmMeta = serde_json::from_value(meta_json()).unwrap();
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_bytes(SectionKind::Config, br#"{"memory_mib":256,"cpus":1}"#)
        .unwrap();
    w.add_bytes(SectionKind::DeviceState, b"QEVM\0\0\0\x03device state")
        .unwrap();
    w.add_file(SectionKind::Memory, &mem_path, 4096, None, &mut |_, _| {})
        .unwrap();
    w.commit(&meta).unwrap();
    Package::open(&path).unwrap();
    let file = std::fs::read(&path).unwrap();
    let table =
        PackageIndex::table_range(Path::new("p"), &file[..4096], file.len() as u64).unwrap();
    let table = file[table.start as usize..table.end as usize].to_vec();
    vec![
        seed("package_file", "package", file),
        seed("package_table", "table", table),
    ]
}

fn status() -> GuestStatus {
    GuestStatus {
        live: true,
        uptime_ms: 1234,
        hostname: "redis-1a2b".into(),
        service_exit: None,
    }
}

fn agent() -> Vec<Seed> {
    let b64 = ferry_agent_proto::b64_encode;
    let replies = [
        (
            "hello",
            1,
            Reply::Hello {
                protocol_version: 1,
                protocol_minor: 1,
                agent_version: "0.1.0".into(),
                status: status(),
            },
        ),
        ("status-event", 0, Reply::Status(status())),
        ("live-event", 0, Reply::Live { uptime_ms: 812 }),
        (
            "exec-result",
            7,
            Reply::ExecResult {
                exit_code: 0,
                stdout_b64: b64(b"PONG\n"),
                stderr_b64: b64(b"warning: something\n"),
                truncated: false,
                timed_out: false,
            },
        ),
        ("quiesced", 8, Reply::Quiesced { took_ms: 3 }),
        (
            "resumed",
            9,
            Reply::Resumed {
                clock_step_ms: 5000,
                rng_reseeded: true,
                status: status(),
            },
        ),
        ("shutting-down", 10, Reply::ShuttingDown),
        ("fleet-set", 11, Reply::FleetSet),
        (
            "error",
            12,
            Reply::Error {
                message: "exec: no such file".into(),
            },
        ),
    ];
    let mut seeds: Vec<Seed> = replies
        .iter()
        .map(|(name, id, r)| seed("agent", name, encode(*id, r)))
        .collect();
    let mut stream = Vec::new();
    for (_, id, r) in &replies[..4] {
        stream.extend(encode(*id, r));
    }
    seeds.push(seed("agent", "stream", stream));
    seeds.push(seed(
        "agent",
        "request-exec",
        encode(
            7,
            &Request::Exec {
                argv: vec!["redis-cli".into(), "ping".into()],
                stdin_b64: None,
                timeout_ms: Some(5000),
            },
        ),
    ));
    // Shell frames ride in the same target (their own decoder).
    let mut shell = Vec::new();
    shell.extend(
        ShellFrame::json(Kind::Hello, 0, &serde_json::json!({"v": 1, "who": "agent"})).encode(),
    );
    shell.extend(ShellFrame::resize(3, 24, 80).encode());
    shell.extend(ShellFrame::new(Kind::Stdout, 3, b"$ ".to_vec()).encode());
    shell.extend(ShellFrame::exit(3, 0).encode());
    seeds.push(seed("agent", "shell-frames", shell));
    seeds
}

fn line<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).unwrap()
}

fn migration() -> Vec<Seed> {
    let token = "0123456789abcdef0123456789abcdef".to_string();
    let mut offer = serde_json::json!({
        "name": "redis-1a2b",
        "meta": meta_json(),
        "disk_size": 1u64 << 30,
        "kernel": {"sha256": "ab".repeat(32), "size": 9_000_000},
        "initramfs": {"sha256": "0123456789abcdef".repeat(4), "size": 4_000_000}
    });
    let vm: VmOffer = serde_json::from_value(offer.take()).unwrap();
    vec![
        seed(
            "migration",
            "hello-control",
            line(&Hello::Control {
                v: 1,
                token: token.clone(),
            }),
        ),
        seed(
            "migration",
            "hello-state",
            line(&Hello::Channel {
                v: 1,
                token: token.clone(),
                session: "5f1e0c2a9b7d4e36".into(),
                channel: ChannelKind::State,
            }),
        ),
        seed(
            "migration",
            "hello-disk",
            line(&Hello::Channel {
                v: 1,
                token,
                session: "5f1e0c2a9b7d4e36".into(),
                channel: ChannelKind::Disk,
            }),
        ),
        seed(
            "migration",
            "offer",
            line(&SourceMsg::Offer {
                session: "5f1e0c2a9b7d4e36".into(),
                vm,
            }),
        ),
        seed(
            "migration",
            "refused",
            line(&SourceMsg::Refused {
                reason: "wrong token: pass the source's --token".into(),
            }),
        ),
        seed(
            "migration",
            "blob",
            line(&SourceMsg::Blob {
                name: "ab".repeat(32),
                len: 9_000_000,
            }),
        ),
        seed(
            "migration",
            "switch",
            line(&SourceMsg::Switch {
                stats: LiveStats {
                    total_ms: 306,
                    downtime_ms: 22,
                    state_bytes: 99_000_000,
                    wire_bytes: 99_100_000,
                    downtime_limit_ms: 0,
                    throttle_pct: 0,
                },
            }),
        ),
        seed(
            "migration",
            "failed",
            line(&SourceMsg::Failed {
                reason: "the engine stopped".into(),
            }),
        ),
        seed(
            "migration",
            "fetch",
            line(&DestMsg::Fetch {
                name: "ab".repeat(32),
            }),
        ),
        seed("migration", "ready", line(&DestMsg::Ready)),
        seed("migration", "committed", line(&DestMsg::Committed)),
        seed(
            "migration",
            "abort",
            line(&DestMsg::Abort {
                reason: "not enough memory".into(),
            }),
        ),
    ]
}

const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const REQUEST_MAGIC: u32 = 0x2560_9513;

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(IHAVEOPT);
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn request(out: &mut Vec<u8>, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn nbd() -> Vec<Seed> {
    // As QEMU's client: fixed newstyle without zeroes, extended headers
    // (refused), structured replies, base:allocation, then GO with the
    // block size asked.
    let mut qemu = 3u32.to_be_bytes().to_vec();
    option(&mut qemu, 11, &[]);
    option(&mut qemu, 8, &[]);
    let mut meta = Vec::new();
    meta.extend_from_slice(&5u32.to_be_bytes());
    meta.extend_from_slice(b"ferry");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(&mut qemu, 10, &meta);
    let mut go = Vec::new();
    go.extend_from_slice(&5u32.to_be_bytes());
    go.extend_from_slice(b"ferry");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes());
    option(&mut qemu, 7, &go);
    request(&mut qemu, 0, 0, 1, 0, 4096); // READ
    request(&mut qemu, 1, 1, 2, 4096, 512); // WRITE, FUA
    qemu.extend(std::iter::repeat_n(0xa5, 512));
    request(&mut qemu, 0, 7, 3, 0, 1 << 20); // BLOCK_STATUS
    request(&mut qemu, 8, 7, 4, 0, 1 << 20); // BLOCK_STATUS, REQ_ONE
    request(&mut qemu, 0, 6, 5, 8192, 4096); // WRITE_ZEROES
    request(&mut qemu, 0, 4, 6, 12288, 4096); // TRIM
    request(&mut qemu, 0, 5, 7, 0, 65536); // CACHE
    request(&mut qemu, 0, 3, 8, 0, 0); // FLUSH
    request(&mut qemu, 0, 2, 9, 0, 0); // DISC

    // The old way in: list, info, then EXPORT_NAME with zeroes.
    let mut old = 1u32.to_be_bytes().to_vec();
    option(&mut old, 3, &[]);
    let mut info = Vec::new();
    info.extend_from_slice(&0u32.to_be_bytes());
    info.extend_from_slice(&2u16.to_be_bytes());
    info.extend_from_slice(&3u16.to_be_bytes());
    info.extend_from_slice(&1u16.to_be_bytes());
    option(&mut old, 6, &info);
    option(&mut old, 9, &[0, 0, 0, 0, 0, 0, 0, 0]);
    option(&mut old, 1, b"ferry");
    request(&mut old, 0, 0, 1, (64 << 20) - 512, 512);
    request(&mut old, 0, 2, 2, 0, 0);

    vec![
        seed("nbd", "qemu-session", qemu),
        seed("nbd", "export-name", old),
    ]
}

fn http_range() -> Vec<Seed> {
    [
        ("range", "bytes=0-4095"),
        ("range-open", "bytes=4096-"),
        ("range-suffix", "bytes=-8192"),
        ("range-case", "Bytes= 5-5 "),
        ("content-range", "bytes 0-4095/10485760"),
        ("unsatisfied", "bytes */10485760"),
    ]
    .into_iter()
    .map(|(name, text)| seed("http_range", name, text.as_bytes()))
    .collect()
}
