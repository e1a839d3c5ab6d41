//! The lazy disk through QEMU's own NBD client (qemu-img, qemu-io) over a
//! real Unix socket, with chunks from a real registry (or a static server)
//! on loopback.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_lazydisk::{ChunkState, LazyDisk, LazyDiskOptions, LocalSection};
use ferry_package::{Package, SectionKind};

#[test]
fn qemu_img_convert_reads_the_whole_disk() {
    let f = Fixture::new(false);
    let out = f.dir.path().join("out.raw");
    let started = Instant::now();
    let o = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &f.uri(),
        out.to_str().unwrap(),
    ]);
    let took = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap() == f.image, "the copy differs");
    let st = f.disk.status();
    eprintln!(
        "qemu-img convert of {SIZE} bytes, every chunk fetched on demand: {took:?} ({:.0} MiB/s)",
        SIZE as f64 / took.as_secs_f64() / (1 << 20) as f64
    );
    // Every chunk but the zero one was fetched, once.
    assert!(st.complete, "{st:?}");
    assert_eq!(st.chunks_fetched, 8, "{st:?}");
    assert_eq!(st.fetch_failures, 0, "{st:?}");
    // The local file is now the disk.
    assert!(std::fs::read(f.disk.path()).unwrap() == f.image);
}

#[test]
fn qemu_img_map_sees_zero_chunks_without_fetching() {
    let f = Fixture::new(false);
    let o = qemu_img(&["map", "--output=json", "-f", "raw", &f.uri()]);
    assert!(o.status.success(), "{}", text(&o));
    let map: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    // Each byte's (zero, data) from the map.
    let at = |offset: u64| {
        let e = map
            .iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap();
                start <= offset && offset < start + e["length"].as_u64().unwrap()
            })
            .expect("the map covers the disk");
        (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap())
    };
    let zero = ZERO_CHUNK as u64 * CHUNK;
    assert_eq!(at(zero), (true, false));
    assert_eq!(at(zero + CHUNK - 1), (true, false));
    assert_eq!(at(zero - 1), (false, true));
    assert_eq!(at(zero + CHUNK), (false, true));
    assert_eq!(at(0), (false, true));
    // Answering it fetched nothing.
    assert_eq!(f.disk.status().chunks_fetched, 0);
}

#[test]
fn a_first_read_fetches_one_chunk_not_the_disk() {
    let f = Fixture::new(false);
    let before = f.remote.bytes_fetched();
    let started = Instant::now();
    let o = qemu_io(&f.uri(), &[&format!("read -P {:#x} 0 64k", pattern(0))]);
    let took = started.elapsed();
    assert_ok(&o);
    eprintln!("qemu-io start, connect and first 64 KiB read: {took:?}");

    let st = f.disk.status();
    assert_eq!(st.chunks_fetched, 1, "{st:?}");
    assert_eq!(st.bytes_fetched, CHUNK, "{st:?}");
    // Over the wire: chunk 0 as stored (about half of it compresses away),
    // nothing else.
    let moved = f.remote.bytes_fetched() - before;
    assert_eq!(moved, f.stored_len(0));
    let disk_stored: u64 = (0..9).map(|i| f.stored_len(i)).sum();
    assert!(moved * 5 < disk_stored, "{moved} of {disk_stored}");
    assert_eq!(f.disk.chunk_state(0), Some(ChunkState::Present));
    assert_eq!(f.disk.chunk_state(1), Some(ChunkState::Absent));
    // The zero chunk was present from the start, with nothing to fetch.
    assert_eq!(f.disk.chunk_state(ZERO_CHUNK), Some(ChunkState::Present));
    let zero_at = ZERO_CHUNK as u64 * CHUNK;
    assert_ok(&qemu_io(&f.uri(), &[&format!("read -P 0 {zero_at} 2M")]));
    assert_eq!(f.disk.status().chunks_fetched, 1);

    // A read across a chunk boundary fetches both sides.
    let o = qemu_io(
        &f.uri(),
        &[
            // Block 31 is random, block 32 (the first of chunk 1) constant.
            &format!("read -P {:#x} 2M 64k", pattern(32)),
            "read 1984k 128k",
        ],
    );
    assert_ok(&o);
    assert_eq!(f.disk.status().chunks_fetched, 2);
}

#[test]
fn writes_stay_local_and_keep_the_chunk_around_them() {
    let f = Fixture::new(false);
    let package_before = std::fs::read(&f.package).unwrap();

    // 4 KiB into chunk 0, at the start of block 16 (constant pattern).
    assert_ok(&qemu_io(&f.uri(), &["write -P 0xab 1M 4k"]));
    // The chunk was fetched first (read-modify-write).
    assert_eq!(f.disk.status().chunks_fetched, 1);
    let o = qemu_io(
        &f.uri(),
        &[
            "read -P 0xab 1M 4k",
            &format!("read -P {:#x} 1052672 61440", pattern(16)),
            &format!("read -P {:#x} 896k 64k", pattern(14)),
        ],
    );
    assert_ok(&o);

    // A write that covers chunk 2 whole needs no fetch.
    assert_ok(&qemu_io(&f.uri(), &["write -P 0xcd 4M 2M"]));
    assert_eq!(f.disk.status().chunks_fetched, 1);
    assert_eq!(f.disk.chunk_state(2), Some(ChunkState::Present));
    // Write-zeroes (with unmap) over part of chunk 4, a discard of chunk 5.
    assert_ok(&qemu_io(
        &f.uri(),
        &["write -z -u 8M 64k", "discard 10M 2M"],
    ));
    assert_eq!(f.disk.chunk_state(5), Some(ChunkState::Present));
    assert_eq!(f.disk.status().chunks_fetched, 2, "chunk 4 only");

    // The whole disk is what was written over the original.
    let mut want = f.image.clone();
    want[1 << 20..(1 << 20) + 4096].fill(0xab);
    want[4 << 20..6 << 20].fill(0xcd);
    want[8 << 20..(8 << 20) + (64 << 10)].fill(0);
    let out = f.dir.path().join("out.raw");
    let o = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &f.uri(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read(&out).unwrap();
    // Chunk 5 was discarded: its content is unspecified (here: zeros).
    assert!(got[10 << 20..12 << 20].iter().all(|&b| b == 0));
    want[10 << 20..12 << 20].fill(0);
    assert!(got == want, "the disk differs from what was written");

    // Nothing went to the server: the package and its chunk are as before.
    assert!(std::fs::read(&f.package).unwrap() == package_before);
    assert!(
        f.remote.read_chunk(SectionKind::Disk, 0).unwrap() == f.image[..CHUNK as usize],
        "the server's chunk 0 changed"
    );
}

#[test]
fn flush_makes_writes_and_the_present_map_durable() {
    let f = Fixture::new(false);
    let o = qemu_io(
        &f.uri(),
        &["write -P 0xcd 3M 4k", "flush", "write -f -P 0xee 9M 4k"],
    );
    assert_ok(&o);
    // As if the host died now: copy the disk file and its present-map as
    // they are on disk, and open the copy with the same package, locally.
    let crash = f.dir.path().join("crash");
    std::fs::create_dir(&crash).unwrap();
    let copy = crash.join("disk.raw");
    std::fs::copy(f.disk.path(), &copy).unwrap();
    std::fs::copy(f.disk.present_map_path(), crash.join("disk.raw.present")).unwrap();
    let source = LocalSection::new(
        Arc::new(Package::open(&f.package).unwrap()),
        SectionKind::Disk,
    )
    .unwrap();
    let restarted = LazyDisk::open(
        &copy,
        source,
        LazyDiskOptions {
            prefetch: false,
            ..LazyDiskOptions::default()
        },
    )
    .unwrap();
    // Chunk 1 (flushed) and chunk 4 (FUA) are there, not fetched again.
    for i in [1, 4] {
        assert_eq!(restarted.chunk_state(i), Some(ChunkState::Present), "{i}");
    }
    let mut buf = vec![0u8; 4096];
    restarted.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xcd));
    restarted.read_at(&mut buf, 9 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xee));
    assert_eq!(restarted.status().chunks_fetched, 0);
}

#[test]
fn reads_past_the_end_fail() {
    let f = Fixture::new(false);
    let o = qemu_io(&f.uri(), &[&format!("read {SIZE} 4k")]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = qemu_io(&f.uri(), &[&format!("read {} 8k", SIZE - 4096)]);
    assert!(!o.status.success(), "{}", text(&o));
    // The last bytes themselves read fine.
    let last = BLOCKS - 1;
    let o = qemu_io(
        &f.uri(),
        &[&format!("read -P {:#x} {} 4k", pattern(last), SIZE - 4096)],
    );
    assert_ok(&o);
}

#[test]
fn a_corrupt_chunk_fails_the_read_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let image = image();
    let package = make_package(dir.path(), "vm.ferry", &image);
    let entry = Package::open(&package)
        .unwrap()
        .section(SectionKind::Disk)
        .unwrap()
        .chunks[5]
        .clone()
        .unwrap();
    flip(&package, entry.offset + 1000);
    // The registry checks the header and table when it starts, not every
    // chunk: it serves the damaged chunk as it is.
    let reg = registry(&package);
    let url = reg.url();
    let f = Fixture::with_url(dir, image, package, &url, ServerGuard::Registry(reg), false);

    let o = qemu_io(&f.uri(), &["read 10M 64k"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("read failed: Input/output error"),
        "{}",
        text(&o)
    );
    let failure = f.disk.last_error().expect("the failure is reported");
    assert_eq!(failure.index, 5);
    assert_eq!(failure.offset, 10 << 20);
    assert!(
        failure
            .message
            .contains("chunk 5 (disk bytes 10485760..12582912)")
            && failure.message.contains("is corrupt"),
        "{}",
        failure.message
    );
    assert!(!failure.message.contains('\n'));
    assert_eq!(f.disk.chunk_state(5), Some(ChunkState::Failed));

    // The next request tries again (and fails again); other chunks work.
    let o = qemu_io(&f.uri(), &["read 11M 4k"]);
    assert!(!o.status.success());
    let st = f.disk.status();
    assert_eq!(st.fetch_failures, 2, "{st:?}");
    assert_ok(&qemu_io(
        &f.uri(),
        &[&format!("read -P {:#x} 8M 64k", pattern(128))],
    ));
    assert!(!f.disk.is_complete());
}

#[test]
fn a_killed_server_fails_only_what_had_not_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let image = image();
    let served = dir.path().join("www");
    std::fs::create_dir(&served).unwrap();
    let package = make_package(&served, "vm.ferry", &image);
    let server = StaticServer::start(&served, 0.0);
    let url = server.url("vm.ferry");
    let mut f = Fixture::with_url(
        dir,
        image,
        package,
        &url,
        ServerGuard::Static(server),
        false,
    );

    assert_ok(&qemu_io(&f.uri(), &["read 0 64k", "read 2M 64k"]));
    let ServerGuard::Static(server) = &mut f.server else {
        unreachable!()
    };
    server.kill();

    // What arrived still reads.
    assert_ok(&qemu_io(
        &f.uri(),
        &[
            &format!("read -P {:#x} 0 64k", pattern(0)),
            &format!("read -P {:#x} 2M 64k", pattern(32)),
        ],
    ));
    // What did not fails, after the client's retries, with one clear error.
    let started = Instant::now();
    let o = qemu_io(&f.uri(), &["read 8M 64k"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("Input/output error"), "{}", text(&o));
    eprintln!(
        "a read of a chunk from a dead server failed after {:?}",
        started.elapsed()
    );
    let failure = f.disk.last_error().unwrap();
    assert_eq!(failure.index, 4);
    assert!(
        failure.message.contains("cannot reach") && failure.message.contains(&url),
        "{}",
        failure.message
    );
}

#[test]
fn prefetch_completes_and_leaves_a_plain_raw_image() {
    let f = Fixture::new(true);
    let started = Instant::now();
    assert!(f.disk.wait_complete(Duration::from_secs(30)));
    eprintln!("prefetch of {SIZE} bytes: {:?}", started.elapsed());
    let st = f.disk.status();
    assert!(st.complete && st.chunks_present == 9, "{st:?}");
    assert_eq!(st.chunks_fetched, 8);
    assert!(std::fs::read(f.disk.path()).unwrap() == f.image);
    // The zero chunk and zero blocks stayed holes.
    let allocated = std::fs::metadata(f.disk.path()).unwrap().blocks() * 512;
    assert!(allocated <= SIZE - CHUNK, "{allocated} bytes allocated");
    // And QEMU reads the same.
    let out = f.dir.path().join("out.raw");
    let o = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &f.uri(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(std::fs::read(&out).unwrap() == f.image);
}

#[test]
fn qemu_block_options_reach_the_export() {
    let f = Fixture::new(false);
    let socket = f.nbd.socket_path().to_str().unwrap().to_string();
    let check = format!("read -P {:#x} 0 64k", pattern(0));

    // The -drive / -blockdev option syntax, as qemu-io --image-opts takes it.
    let opts =
        format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={socket}");
    let o = run_qemu_io_opts(&opts, &check);
    assert_ok(&o);
    // The same in JSON (what QMP blockdev-add takes).
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{socket}"}}}}}}"#
    );
    assert_ok(&qemu_io(&json, &[&check]));
    // By export name, and an unknown name is refused.
    let named = format!("nbd+unix:///ferry?socket={socket}");
    assert_ok(&qemu_io(&named, &[&check]));
    let o = qemu_io(&format!("nbd+unix:///other?socket={socket}"), &[&check]);
    assert!(!o.status.success());
    assert!(text(&o).contains("other"), "{}", text(&o));
    // qemu-img sees the size.
    let o = qemu_img(&["info", "--output=json", &f.uri()]);
    assert!(o.status.success());
    assert!(
        text(&o).contains(&format!("\"virtual-size\": {SIZE}")),
        "{}",
        text(&o)
    );
    assert!(f.nbd.connections_accepted() >= 5);
}

fn run_qemu_io_opts(opts: &str, command: &str) -> std::process::Output {
    let o = std::process::Command::new("qemu-io")
        .args(["--image-opts", "-c", command, opts])
        .output()
        .unwrap();
    eprintln!("$ qemu-io --image-opts -c '{command}' {opts}\n{}", text(&o));
    o
}

#[test]
fn several_clients_at_once() {
    let f = Fixture::new(false);
    let uri = f.uri();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|k| {
                let uri = &uri;
                s.spawn(move || {
                    // Two clients on chunk 6, two on chunks 7 and 8.
                    let block = [192, 194, 224, 256][k];
                    let at = block * BLOCK;
                    qemu_io(uri, &[&format!("read -P {:#x} {at} 64k", pattern(block))])
                })
            })
            .collect();
        for h in handles {
            assert_ok(&h.join().unwrap());
        }
    });
    let st = f.disk.status();
    assert_eq!(st.chunks_fetched, 3, "{st:?}");
    // Each connection closes once its client has gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.nbd.live_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(f.nbd.live_connections(), 0);
    assert_eq!(f.nbd.connections_accepted(), 4);
}

#[test]
fn qemu_system_takes_the_export_as_a_drive() {
    // QEMU itself (paused, no guest runs) with the export as the backend of
    // a virtio-blk device, in the three spellings; its monitor's qemu-io
    // reads through the device's block backend.
    let f = Fixture::new(false);
    let sock = f.nbd.socket_path().to_str().unwrap().to_string();
    let check = format!("read -P {:#x} 0 64k", pattern(0));
    for backend in [
        vec![
            "-blockdev".to_string(),
            format!("driver=raw,node-name=d0,file.driver=nbd,file.server.type=unix,file.server.path={sock}"),
        ],
        vec![
            "-drive".to_string(),
            format!("id=d0,if=none,driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock}"),
        ],
        vec![
            "-drive".to_string(),
            format!("id=d0,if=none,format=raw,file=nbd+unix:///?socket={sock}"),
        ],
    ] {
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args(["-M", "microvm", "-accel", "tcg", "-S", "-nodefaults"])
            .args(["-display", "none", "-monitor", "stdio"])
            .args(&backend)
            .args(["-device", "virtio-blk-device,drive=d0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 runs");
        use std::io::Write;
        let script = format!("info block\nqemu-io d0 \"{check}\"\nquit\n");
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let t = text(&out);
        assert!(out.status.success(), "{backend:?}: {t}");
        assert!(t.contains(&format!("nbd+unix://?socket={sock} (raw)")), "{backend:?}: {t}");
        assert!(t.contains("read 65536/65536 bytes at offset 0"), "{backend:?}: {t}");
        assert!(!t.contains("Pattern verification failed"), "{backend:?}: {t}");
    }
    assert_eq!(f.disk.status().chunks_fetched, 1);
}

/// A plain file served on a TCP connection the test accepted itself (as a
/// destination serves a received disk on its peer's connection): QEMU's
/// NBD client copies a whole image into it, zeros as holes, and nothing
/// reaches the file once the connection is stopped.
#[test]
fn a_file_disk_is_filled_over_an_accepted_tcp_connection() {
    use ferry_lazydisk::{Export, FileDisk, NbdConnection, NbdOptions};
    use std::net::TcpListener;

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.raw");
    let image = image();
    std::fs::write(&source, &image).unwrap();
    let target = dir.path().join("target.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let disk: Arc<dyn Export> = Arc::new(FileDisk::open(&target).unwrap());
    let options = NbdOptions {
        export_name: "disk0".into(),
        ..NbdOptions::default()
    };

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let uri = format!("nbd://127.0.0.1:{port}/disk0");
    let copy = {
        let (source, uri) = (source.clone(), uri.clone());
        std::thread::spawn(move || {
            qemu_img(&[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                source.to_str().unwrap(),
                &uri,
            ])
        })
    };
    let (tcp, _) = listener.accept().unwrap();
    let served = NbdConnection::serve(tcp, disk.clone(), options.clone()).unwrap();
    let o = copy.join().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&target).unwrap() == image, "the copy differs");
    // The zero chunk arrived as a hole, not as written zeros.
    let zero = ZERO_CHUNK as u64 * CHUNK;
    assert!(disk.extents(zero, CHUNK).unwrap().iter().all(|e| e.zero));
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(allocated <= SIZE - CHUNK, "{allocated} of {SIZE} allocated");
    served.stop();

    // A connection stopped before its client writes: the write fails and
    // the file is as it was.
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || qemu_io(&uri, &["write -P 0x5a 0 64k"]))
    };
    let (tcp, _) = listener.accept().unwrap();
    let served = NbdConnection::serve(tcp, disk.clone(), options).unwrap();
    served.stop();
    let o = writer.join().unwrap();
    let failed = !o.status.success() || text(&o).contains("error") || text(&o).contains("failed");
    assert!(failed, "{}", text(&o));
    assert!(
        std::fs::read(&target).unwrap() == image,
        "a write got through"
    );
}
