//! `RemotePackage` against a ferry registry and against plain static file
//! servers, over real HTTP on loopback: it reads what a local `Package`
//! reads, and every failure (a token, a damaged chunk, a server without
//! ranges, a server that dies) is one clear line.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_package::{Package, PackageError, SectionKind};
use ferry_transport::{RemotePackage, TransportError};

/// Every chunk of every section reads the same remotely as locally.
fn assert_same_as_local(remote: &RemotePackage, local: &Package) {
    assert_eq!(remote.sections(), local.sections());
    assert_eq!(remote.vm_meta().unwrap(), local.vm_meta().unwrap());
    assert_eq!(remote.file_size(), local.file_size());
    assert_eq!(remote.index().table_sha256(), local.index().table_sha256());
    for s in local.sections() {
        for i in 0..s.chunk_count() {
            assert_eq!(
                remote.read_chunk(s.kind, i).unwrap(),
                local.read_chunk(s.kind, i).unwrap(),
                "chunk {i} of {}",
                s.kind
            );
        }
    }
}

/// What reading every chunk should cost: the header, the table and the
/// stored chunks, which is the whole file (the writer leaves no gaps); zero
/// chunks cost nothing.
fn expected_bytes(local: &Package) -> u64 {
    local.file_size()
}

fn one_line(e: &TransportError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

#[test]
fn reads_every_chunk_from_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let local = Package::open(&a).unwrap();
    let reg = serve(&[&a], None);

    let listing_len = get(reg.local_addr(), "/").body.len() as u64;
    for (url, extra) in [
        (format!("{}packages/a.ferry", reg.url()), 0),
        // A root serving one package resolves to it, for the listing's cost.
        (reg.url(), listing_len),
    ] {
        let remote = RemotePackage::open(&url, None).unwrap();
        assert_eq!(remote.url(), format!("{}packages/a.ferry", reg.url()));
        let after_open = remote.bytes_fetched();
        assert!(after_open > 4096 + extra, "{after_open}");
        assert!(after_open < expected_bytes(&local) / 2, "{after_open}");
        assert_same_as_local(&remote, &local);
        assert_eq!(remote.bytes_fetched(), expected_bytes(&local) + extra);
    }

    // Zero chunks are not fetched.
    let remote = RemotePackage::open(&reg.url(), None).unwrap();
    let before = remote.bytes_fetched();
    let mem = remote.section(SectionKind::Memory).unwrap();
    assert!(mem.chunks[1].is_none());
    assert_eq!(
        remote.read_chunk(SectionKind::Memory, 1).unwrap(),
        vec![0; CHUNK as usize]
    );
    assert_eq!(remote.bytes_fetched(), before);

    // Asking for what the package lacks is the package's error.
    let e = remote.read_chunk(SectionKind::Disk, 0).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Package(PackageError::MissingSection { .. })
        ),
        "{e}"
    );
    assert!(one_line(&e).contains(remote.url()), "{e}");
    let e = remote.read_chunk(SectionKind::Memory, 99).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Package(PackageError::ChunkOutOfRange { .. })
        ),
        "{e}"
    );
}

/// A remote package's metadata reads as a local one's: fields from a newer
/// writer are ignored; a missing one is bad input naming the URL and field.
#[test]
fn vm_metadata_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let mut newer = vm_meta_json("a.ferry");
    newer["added_later"] = serde_json::json!([1, 2]);
    set_metadata(&a, newer);
    let reg = serve(&[&a], None);
    let remote = RemotePackage::open(&reg.url(), None).unwrap();
    assert_eq!(remote.vm_meta().unwrap(), vm_meta("a.ferry"));

    let b = make_package(dir.path(), "b.ferry", 2);
    let mut older = vm_meta_json("b.ferry");
    older.as_object_mut().unwrap().remove("liveness");
    set_metadata(&b, older);
    let reg = serve(&[&b], None);
    let remote = RemotePackage::open(&reg.url(), None).unwrap();
    let e = remote.vm_meta().unwrap_err();
    match &e {
        TransportError::Package(PackageError::NotAVmPackage { package, detail }) => {
            assert_eq!(package, remote.url());
            assert!(detail.contains("`liveness`"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        one_line(&e).contains("make it again with 'ferry package'"),
        "{e}"
    );
}

#[test]
fn chunks_read_from_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 3);
    let local = Package::open(&a).unwrap();
    let reg = serve(&[&a], None);
    let remote = RemotePackage::open(&reg.url(), None).unwrap();
    let mem = local.section(SectionKind::Memory).unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (remote, local) = (&remote, &local);
            s.spawn(move || {
                for i in (0..mem.chunk_count()).map(|i| (i + t) % mem.chunk_count()) {
                    assert_eq!(
                        remote.read_chunk(SectionKind::Memory, i).unwrap(),
                        local.read_chunk(SectionKind::Memory, i).unwrap()
                    );
                }
            });
        }
    });
}

#[test]
fn a_root_with_several_packages_asks_which() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let b = make_package(dir.path(), "b.ferry", 2);
    let reg = serve(&[&a, &b], None);
    let e = RemotePackage::open(&reg.url(), None).unwrap_err();
    assert!(matches!(e, TransportError::AmbiguousRegistry { .. }), "{e}");
    assert_eq!(
        one_line(&e),
        format!(
            "the registry at {0} serves 2 packages (a.ferry, b.ferry): pick one with {0}packages/NAME",
            reg.url()
        )
    );
    // Each is still reachable by name.
    let remote = RemotePackage::open(&format!("{}packages/b.ferry", reg.url()), None).unwrap();
    assert_same_as_local(&remote, &Package::open(&b).unwrap());
}

#[test]
fn tokens() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let reg = serve(&[&a], Some("tok-123-tok-123-tok"));
    let url = format!("{}packages/a.ferry", reg.url());

    let e = RemotePackage::open(&url, None).unwrap_err();
    assert_eq!(
        one_line(&e),
        format!(
            "{url}: 401 Unauthorized: the registry needs a token: pass --token or --token-file"
        )
    );
    // A short token is refused before any request (the server's log
    // would show one otherwise; here the message is the token's own).
    let e = RemotePackage::open(&reg.url(), Some("nope")).unwrap_err();
    assert_eq!(
        one_line(&e),
        "the token is 4 characters; use at least 16 (e.g. `openssl rand -hex 16`)"
    );
    let e = RemotePackage::open(&reg.url(), Some("nope-nope-nope-nope")).unwrap_err();
    assert_eq!(
        one_line(&e),
        format!(
            "{}: 401 Unauthorized: the registry refused the token: check --token or --token-file",
            reg.url()
        )
    );
    let remote = RemotePackage::open(&reg.url(), Some("tok-123-tok-123-tok")).unwrap();
    assert_same_as_local(&remote, &Package::open(&a).unwrap());
}

#[test]
fn missing_packages_and_bad_urls() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let reg = serve(&[&a], None);
    let url = format!("{}packages/nope.ferry", reg.url());
    let e = RemotePackage::open(&url, None).unwrap_err();
    assert!(matches!(e, TransportError::NotFound { .. }), "{e}");
    assert!(
        one_line(&e).starts_with(&format!("{url}: 404 Not Found")),
        "{e}"
    );

    for url in ["ftp://x/y", "a/path", "http:///nohost"] {
        let e = RemotePackage::open(url, None).unwrap_err();
        assert!(matches!(e, TransportError::BadUrl { .. }), "{url}: {e}");
    }
}

#[test]
fn an_unreachable_server_is_retried_then_named() {
    // A port nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/packages/a.ferry");
    let start = Instant::now();
    let e = RemotePackage::open(&url, None).unwrap_err();
    assert!(
        matches!(e, TransportError::Connect { attempts: 4, .. }),
        "{e}"
    );
    let msg = one_line(&e);
    assert!(
        msg.starts_with(&format!("cannot reach {url} after 4 attempts (")),
        "{msg}"
    );
    assert!(
        msg.ends_with("check the address and that the server is running"),
        "{msg}"
    );
    // It backed off between attempts (200 + 400 + 800 ms).
    assert!(start.elapsed() >= Duration::from_millis(1400));
}

#[test]
fn a_restarting_registry_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The registry comes up a little after the client starts trying.
    let a2 = a.clone();
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        ferry_transport::Registry::bind(ferry_transport::RegistryConfig {
            packages: vec![a2],
            listen: addr,
            token: None,
        })
        .unwrap()
        .spawn()
        .unwrap()
    });
    let remote = RemotePackage::open(&format!("http://{addr}/"), None).unwrap();
    let _reg = server.join().unwrap();
    assert_same_as_local(&remote, &Package::open(&a).unwrap());
}

#[test]
fn python_http_server_without_ranges_is_refused_clearly() {
    // Python's http.server (3.11 here) ignores Range and sends the whole
    // file: reading a package through it would download the whole file per
    // chunk, so the client says so instead.
    let dir = tempfile::tempdir().unwrap();
    make_package(dir.path(), "a.ferry", 1);
    let server = python_http_server(dir.path());
    let url = server.url("a.ferry");
    let e = RemotePackage::open(&url, None).unwrap_err();
    assert!(
        matches!(e, TransportError::RangeUnsupported { status: 200, .. }),
        "{e}"
    );
    let msg = one_line(&e);
    assert!(
        msg.starts_with(&format!(
            "{url}: the server ignored the Range request for the package header"
        )),
        "{msg}"
    );
    assert!(msg.contains("supports range requests"), "{msg}");

    // Its root is a directory page, not a registry listing.
    let e = RemotePackage::open(&server.url(""), None).unwrap_err();
    assert!(matches!(e, TransportError::NotARegistry { .. }), "{e}");
    assert!(
        one_line(&e).ends_with(
            "give the package's own URL (http://HOST:PORT/packages/NAME or the file's URL)"
        ),
        "{e}"
    );
}

#[test]
fn any_static_server_with_ranges_will_do() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 5);
    let local = Package::open(&a).unwrap();
    let server = range_server(dir.path(), 0.0);
    let remote = RemotePackage::open(&server.url("a.ferry"), None).unwrap();
    assert_same_as_local(&remote, &local);
    assert_eq!(remote.bytes_fetched(), expected_bytes(&local));
}

#[test]
fn a_damaged_chunk_on_the_server_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let served = tempfile::tempdir().unwrap();
    let copy = served.path().join("a.ferry");
    std::fs::copy(&a, &copy).unwrap();
    let local = Package::open(&a).unwrap();
    let entry = local.section(SectionKind::Memory).unwrap().chunks[3]
        .clone()
        .unwrap();
    flip(&copy, entry.offset + 10);

    // The registry would check only the header and table at start, so a
    // damaged chunk is served all the same; a plain static server too.
    let server = range_server(served.path(), 0.0);
    let url = server.url("a.ferry");
    let remote = RemotePackage::open(&url, None).unwrap();
    let e = remote.read_chunk(SectionKind::Memory, 3).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::ChunkCorrupt { section: SectionKind::Memory, index: 3, offset, .. }
                if offset == entry.offset
        ),
        "{e}"
    );
    assert_eq!(
        one_line(&e),
        format!(
            "{url}: chunk 3 of section memory (file offset {}) is corrupt: the copy on the server is damaged; rebuild the package or fetch it from elsewhere",
            entry.offset
        )
    );
    // The other chunks are fine.
    for i in [0, 2, 4] {
        assert_eq!(
            remote.read_chunk(SectionKind::Memory, i).unwrap(),
            local.read_chunk(SectionKind::Memory, i).unwrap()
        );
    }

    // A damaged table is caught at open, naming the URL.
    let table_start = local.file_size() - 10;
    flip(&copy, table_start);
    let e = RemotePackage::open(&url, None).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Package(PackageError::TableCorrupt { .. })
        ),
        "{e}"
    );
    assert!(
        one_line(&e).starts_with(&format!("{url}: the section table is corrupt")),
        "{e}"
    );

    // Something that is not a package at all.
    std::fs::write(served.path().join("notes.txt"), "hello").unwrap();
    let e = RemotePackage::open(&server.url("notes.txt"), None).unwrap_err();
    assert!(
        matches!(e, TransportError::Package(PackageError::NotAPackage(_))),
        "{e}"
    );
    std::fs::write(served.path().join("empty"), "").unwrap();
    let e = RemotePackage::open(&server.url("empty"), None).unwrap_err();
    assert!(
        matches!(e, TransportError::Package(PackageError::Truncated { .. })),
        "{e}"
    );
}

#[test]
fn a_server_killed_mid_read_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    make_big_package(dir.path(), "big.ferry", size);
    // 64 KiB per 30 ms: the 4 MiB chunk takes about two seconds, so a kill
    // after 400 ms lands mid-transfer even on a busy host.
    let mut server = range_server(dir.path(), 0.03);
    let url = server.url("big.ferry");
    let remote = RemotePackage::open(&url, None).unwrap();
    let pid = server.child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // child's, not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    });
    let e = remote.read_chunk(SectionKind::Disk, 0).unwrap_err();
    killer.join().unwrap();
    let _ = server.child.wait();
    let TransportError::Interrupted { got, expected, .. } = &e else {
        panic!("{e}");
    };
    assert_eq!(*expected, size as u64);
    assert!(*got > 0 && *got < *expected, "{e}");
    let msg = one_line(&e);
    assert!(
        msg.starts_with(&format!(
            "{url}: the transfer of chunk 0 of section disk broke after {got} of {size} bytes ("
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with("the server went away; check it is running and retry"),
        "{msg}"
    );

    // Reading again finds nobody there.
    let e = remote.read_chunk(SectionKind::Disk, 0).unwrap_err();
    assert!(matches!(e, TransportError::Connect { .. }), "{e}");
}

/// A signed package over HTTP: the signature block is fetched (one 128-byte
/// range) and checked against the table; a `#sha256=` pin is checked right
/// after the table is read; the listing names the signer.
#[test]
fn signatures_and_pins_over_http() {
    use ferry_package::{PackageWriter, SecretKey, TrustedKeys, SIGNATURE_BLOCK_LEN};
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate();
    let unsigned = make_package(dir.path(), "u.ferry", 1);
    // The same content, signed.
    let signed = dir.path().join("s.ferry");
    let local = Package::open(&unsigned).unwrap();
    let mut w = PackageWriter::create(&signed).unwrap();
    for s in local.sections() {
        w.add_bytes(s.kind, &local.read_bytes(s.kind).unwrap())
            .unwrap();
    }
    w.sign_with(key.clone());
    w.commit(&local.vm_meta().unwrap()).unwrap();
    let reg = serve(&[&unsigned, &signed], None);
    let base = format!("http://{}/packages", reg.local_addr());

    let remote = RemotePackage::open(&format!("{base}/s.ferry"), None).unwrap();
    let sig = remote.index().signature().expect("signed");
    assert!(sig.matches_table);
    assert_eq!(sig.signer, key.public_key());
    TrustedKeys::new(vec![key.public_key()])
        .check(remote.index())
        .unwrap();
    let header_and_table = HEADER_SIZE_U64 + table_len(&signed);
    assert_eq!(
        remote.bytes_fetched(),
        header_and_table + SIGNATURE_BLOCK_LEN
    );
    // An unsigned package costs no request for a block it cannot have.
    let remote = RemotePackage::open(&format!("{base}/u.ferry"), None).unwrap();
    assert!(remote.index().signature().is_none());
    assert_eq!(
        remote.bytes_fetched(),
        HEADER_SIZE_U64 + table_len(&unsigned)
    );
    let err = TrustedKeys::new(vec![key.public_key()])
        .check(remote.index())
        .unwrap_err();
    assert!(matches!(err, PackageError::NotSigned { .. }), "{err}");

    // Pins.
    let digest = Package::open(&signed).unwrap().index().table_sha256();
    let pinned = format!("{base}/s.ferry#sha256={digest}");
    let remote = RemotePackage::open(&pinned, None).unwrap();
    assert_eq!(remote.url(), format!("{base}/s.ferry"));
    let err = RemotePackage::open(&format!("{base}/u.ferry#sha256={digest}"), None).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Package(PackageError::PinMismatch { .. })
        ),
        "{err}"
    );
    assert!(one_line(&err).contains("is not the pinned one"), "{err}");

    // The listing names the signer (for people; clients check themselves).
    let r = get(reg.local_addr(), "/");
    let listing: ferry_transport::Listing = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(listing.packages[0].signed_by, None);
    assert_eq!(
        listing.packages[1].signed_by.as_deref(),
        Some(key.public_key().key_id().as_str())
    );
}

const HEADER_SIZE_U64: u64 = ferry_package::HEADER_SIZE;

fn table_len(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_le_bytes(bytes[24..32].try_into().unwrap())
}
