//! `LazyDisk` through its own API: one fetch per chunk however many wait
//! for it, a restart that fetches only what is missing, files it refuses
//! to resume, and background fetching that gives way, pauses and keeps to
//! a rate.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use ferry_lazydisk::{
    ChunkSource, ChunkState, LazyDisk, LazyDiskError, LazyDiskOptions, LocalSection, RemoteSection,
};
use ferry_package::{Package, SectionKind};
use ferry_transport::RemotePackage;

fn options(prefetch: bool) -> LazyDiskOptions {
    LazyDiskOptions {
        prefetch,
        ..LazyDiskOptions::default()
    }
}

fn local_source(package: &Path) -> LocalSection {
    LocalSection::new(Arc::new(Package::open(package).unwrap()), SectionKind::Disk).unwrap()
}

fn remote_source(url: &str) -> RemoteSection {
    RemoteSection::new(
        Arc::new(RemotePackage::open(url, None).unwrap()),
        SectionKind::Disk,
    )
    .unwrap()
}

fn read_all(disk: &LazyDisk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn concurrent_requests_for_one_chunk_wait_for_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let image = image();
    make_package(&www, "vm.ferry", &image);
    // 10 ms per 64 KiB sent: chunk 1 (about 1 MiB stored) takes ~160 ms,
    // long enough for every reader to arrive while it is in flight.
    let server = StaticServer::start(&www, 0.01);
    let source = remote_source(&server.url("vm.ferry"));
    let package = source.package().clone();
    let stored = source.info().chunks[1].as_ref().unwrap().stored_len;
    let disk = LazyDisk::open(&dir.path().join("disk.raw"), source, options(false)).unwrap();
    let before = package.bytes_fetched();

    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for k in 0..8u64 {
            let (disk, image, barrier) = (&disk, &image, &barrier);
            s.spawn(move || {
                let at = (2 << 20) + k * 200_000;
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                disk.read_at(&mut buf, at).unwrap();
                assert!(buf == image[at as usize..at as usize + 4096]);
            });
        }
    });
    let st = disk.status();
    assert_eq!(st.chunks_fetched, 1, "{st:?}");
    assert_eq!(package.bytes_fetched() - before, stored);
}

#[test]
fn a_restarted_disk_fetches_only_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let image = image();
    let package = make_package(dir.path(), "vm.ferry", &image);
    let reg = registry(&package);
    let path = dir.path().join("disk.raw");

    let mut want = image.clone();
    {
        let disk = LazyDisk::open(&path, remote_source(&reg.url()), options(false)).unwrap();
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 0).unwrap();
        disk.write_at(&[0x77; 2 << 20], 4 << 20).unwrap();
        disk.write_at(&[0x55; 100], (2 << 20) + 5).unwrap();
        want[4 << 20..6 << 20].fill(0x77);
        want[(2 << 20) + 5..(2 << 20) + 105].fill(0x55);
        assert_eq!(disk.status().chunks_fetched, 2);
        // Dropping writes the present-map.
    }
    // As if the last run died while chunk 6 was half written: bytes where
    // the disk has zeros (blocks 200..204).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xee; 8192], 200 * BLOCK as u64).unwrap();
    }

    let source = remote_source(&reg.url());
    let package2 = source.package().clone();
    let after_open = package2.bytes_fetched();
    let disk = LazyDisk::open(&path, source, options(false)).unwrap();
    for (i, want_state) in [
        ChunkState::Present, // read
        ChunkState::Present, // partly written, so fetched
        ChunkState::Present, // written whole
        ChunkState::Present, // zero
        ChunkState::Absent,
        ChunkState::Absent,
        ChunkState::Absent,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(disk.chunk_state(i), Some(want_state), "chunk {i}");
    }
    let mut buf = vec![0u8; 100];
    disk.read_at(&mut buf, (2 << 20) + 5).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55));
    assert_eq!(disk.status().chunks_fetched, 0);

    disk.resume_prefetch();
    assert!(disk.wait_complete(Duration::from_secs(30)));
    let st = disk.status();
    assert_eq!(st.chunks_fetched, 5, "chunks 4 to 8: {st:?}");
    let stored: u64 = (4..9)
        .map(|i| {
            package2.section(SectionKind::Disk).unwrap().chunks[i]
                .as_ref()
                .map_or(0, |c| c.stored_len)
        })
        .sum();
    assert_eq!(package2.bytes_fetched() - after_open, stored);
    // The half-written chunk holds the disk's bytes, zeros included.
    assert!(read_all(&disk) == want);
    assert!(std::fs::read(&path).unwrap() == want);
}

#[test]
fn files_that_cannot_be_resumed_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = image();
    let package = make_package(dir.path(), "vm.ferry", &image);
    let path = dir.path().join("disk.raw");
    let one_line = |e: &LazyDiskError| {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        s
    };

    // Two lazy disks on one file.
    let disk = LazyDisk::open(&path, local_source(&package), options(false)).unwrap();
    let e = LazyDisk::open(&path, local_source(&package), options(false)).unwrap_err();
    assert!(matches!(e, LazyDiskError::InUse { .. }), "{e}");
    assert!(one_line(&e).contains("another lazy disk"), "{e}");
    let map = disk.present_map_path().to_path_buf();
    drop(disk);

    // Another disk's package.
    let mut other_image = image.clone();
    other_image[0] ^= 1;
    let other = make_package(dir.path(), "other.ferry", &other_image);
    let e = LazyDisk::open(&path, local_source(&other), options(false)).unwrap_err();
    assert!(matches!(e, LazyDiskError::OtherDisk { .. }), "{e}");
    assert!(one_line(&e).contains("was filled from another disk"), "{e}");

    // A damaged present-map.
    let mut bytes = std::fs::read(&map).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    std::fs::write(&map, &bytes).unwrap();
    let e = LazyDisk::open(&path, local_source(&package), options(false)).unwrap_err();
    assert!(matches!(e, LazyDiskError::PresentMapCorrupt { .. }), "{e}");
    assert!(one_line(&e).contains("checksum"), "{e}");

    // No present-map at all: nothing in the file can be trusted.
    std::fs::remove_file(&map).unwrap();
    let e = LazyDisk::open(&path, local_source(&package), options(false)).unwrap_err();
    assert!(matches!(e, LazyDiskError::NoPresentMap { .. }), "{e}");
    assert_eq!(
        one_line(&e),
        format!(
            "{} exists but {} does not: it was not made by a lazy disk, or its record of fetched chunks is lost; remove it to fetch the disk again",
            path.display(),
            map.display()
        )
    );

    // Removing the file starts afresh.
    std::fs::remove_file(&path).unwrap();
    let disk = LazyDisk::open(&path, local_source(&package), options(true)).unwrap();
    assert!(disk.wait_complete(Duration::from_secs(30)));
    assert!(std::fs::read(&path).unwrap() == image);
}

#[test]
fn requests_past_the_end_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let package = make_package(dir.path(), "vm.ferry", &image());
    let disk = LazyDisk::open(
        &dir.path().join("disk.raw"),
        local_source(&package),
        options(false),
    )
    .unwrap();
    let mut buf = vec![0u8; 8192];
    let e = disk.read_at(&mut buf, SIZE - 4096).unwrap_err();
    assert!(matches!(e, LazyDiskError::OutOfRange { .. }), "{e}");
    assert!(
        e.to_string().ends_with(&format!(
            "8192 bytes at offset {} reach past the end of the disk ({SIZE} bytes)",
            SIZE - 4096
        )),
        "{e}"
    );
    assert!(disk.write_at(&buf, u64::MAX - 4).is_err());
    assert!(disk.trim(SIZE, 1).is_err());
    assert_eq!(disk.status().chunks_fetched, 0);
    // Zero-length requests at the end are fine.
    disk.read_at(&mut [], SIZE).unwrap();
}

#[test]
fn a_local_package_is_a_source_too() {
    let dir = tempfile::tempdir().unwrap();
    let image = image();
    let package = make_package(dir.path(), "vm.ferry", &image);
    let source = local_source(&package);
    assert_eq!(ChunkSource::len(&source), SIZE);
    assert_eq!(source.chunk_count(), 9);
    assert!(source.is_zero(ZERO_CHUNK) && !source.is_zero(0));
    assert!(source.describe().contains("section disk of"));
    let disk = LazyDisk::open(&dir.path().join("disk.raw"), source, options(false)).unwrap();
    assert!(read_all(&disk) == image);
    let st = disk.status();
    assert!(st.complete && st.bytes_transferred.is_none(), "{st:?}");
    // Everything but the zero chunk.
    assert_eq!(st.bytes_fetched, SIZE - CHUNK);
}

#[test]
fn prefetch_pauses_keeps_a_rate_and_gives_way() {
    let dir = tempfile::tempdir().unwrap();
    let image = image();
    let package = make_package(dir.path(), "vm.ferry", &image);
    // 4 MiB/s: two chunks a second.
    let disk = LazyDisk::open(
        &dir.path().join("disk.raw"),
        local_source(&package),
        LazyDiskOptions {
            prefetch_rate: Some(4 << 20),
            ..LazyDiskOptions::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let fetched = disk.status().chunks_fetched;
    // Unlimited, all 8 would be here in a few tens of milliseconds.
    assert!((1..=4).contains(&fetched), "{fetched} chunks in 600 ms");

    disk.pause_prefetch();
    std::thread::sleep(Duration::from_millis(100));
    let paused = disk.status();
    assert!(paused.prefetch_paused);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(disk.status().chunks_fetched, paused.chunks_fetched);
    // Requests still fetch while background work is paused.
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 16 << 20).unwrap();
    assert!(buf == image[16 << 20..(16 << 20) + 4096]);

    disk.set_prefetch_rate(None);
    disk.resume_prefetch();
    assert!(disk.wait_complete(Duration::from_secs(30)));
    assert_eq!(disk.status().chunks_fetched, 8);
    assert!(std::fs::read(disk.path()).unwrap() == image);
}

#[test]
fn a_request_does_not_queue_behind_background_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let image = image();
    make_package(&www, "vm.ferry", &image);
    // About 160 ms per chunk: the whole disk takes more than a second.
    let server = StaticServer::start(&www, 0.01);
    let disk = LazyDisk::open(
        &dir.path().join("disk.raw"),
        remote_source(&server.url("vm.ferry")),
        LazyDiskOptions {
            prefetch_threads: 1,
            ..LazyDiskOptions::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 15 << 20).unwrap();
    let demand = started.elapsed();
    assert!(buf == image[15 << 20..(15 << 20) + 4096]);
    let ahead = disk.status().chunks_fetched;
    assert!(disk.wait_complete(Duration::from_secs(30)));
    let all = started.elapsed();
    eprintln!("chunk 7 on demand: {demand:?} ({ahead} chunks fetched by then); all: {all:?}");
    // It went before the chunks in front of it, not after them.
    assert!(
        ahead <= 3,
        "{ahead} chunks fetched before the request was served"
    );
    assert!(demand * 3 < all, "{demand:?} of {all:?}");
}
