//! The registry server over real HTTP on loopback: listing, whole files,
//! ranges, HEAD, conditional requests, unknown names and traversal, tokens,
//! start-up errors and concurrent clients.

mod common;

use std::path::PathBuf;

use common::*;
use ferry_package::Package;
use ferry_transport::{Listing, Registry, RegistryConfig, TransportError};

fn two_packages() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let a = make_package(dir.path(), "a.ferry", 1);
    let b = make_package(dir.path(), "b v2.ferry", 2);
    (dir, a, b)
}

fn etag(path: &std::path::Path) -> String {
    format!(
        "\"{}\"",
        Package::open(path).unwrap().index().table_sha256()
    )
}

#[test]
fn listing_names_every_package() {
    let (_dir, a, b) = two_packages();
    let reg = serve(&[&a, &b], None);
    let r = get(reg.local_addr(), "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let listing: Listing = serde_json::from_slice(&r.body).unwrap();
    let names: Vec<_> = listing.packages.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a.ferry", "b v2.ferry"]);
    for (p, path) in listing.packages.iter().zip([&a, &b]) {
        let pkg = Package::open(path).unwrap();
        assert_eq!(p.size, std::fs::metadata(path).unwrap().len());
        assert_eq!(p.table_sha256, pkg.index().table_sha256());
    }
    assert_eq!(listing.packages[0].url, "/packages/a.ferry");
    assert_eq!(listing.packages[1].url, "/packages/b%20v2.ferry");
    // The listed URL works as given.
    let r = get(reg.local_addr(), &listing.packages[1].url);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, std::fs::read(&b).unwrap());
}

#[test]
fn full_get_returns_the_file() {
    let (_dir, a, _) = two_packages();
    let bytes = std::fs::read(&a).unwrap();
    let reg = serve(&[&a], None);
    let r = get(reg.local_addr(), "/packages/a.ferry");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);
    assert_eq!(
        r.header("content-length"),
        Some(bytes.len().to_string().as_str())
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("etag"), Some(etag(&a).as_str()));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("content-range"), None);
}

#[test]
fn ranges() {
    let (_dir, a, _) = two_packages();
    let bytes = std::fs::read(&a).unwrap();
    let len = bytes.len();
    let reg = serve(&[&a], None);
    let addr = reg.local_addr();
    let range = |spec: &str| request(addr, "GET", "/packages/a.ferry", &[("Range", spec)]);

    for (spec, first, last) in [
        ("bytes=0-9".to_string(), 0, 9),
        ("bytes=4096-8191".to_string(), 4096, 8191),
        (format!("bytes={}-", len - 100), len - 100, len - 1),
        ("bytes=-50".to_string(), len - 50, len - 1),
        (format!("bytes=10-{}", len * 2), 10, len - 1),
        (format!("bytes=-{}", len * 3), 0, len - 1),
        (format!("bytes={}-{}", len - 1, len - 1), len - 1, len - 1),
    ] {
        let r = range(&spec);
        assert_eq!(r.status, 206, "{spec}");
        assert_eq!(r.body, &bytes[first..=last], "{spec}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {first}-{last}/{len}").as_str()),
            "{spec}"
        );
        assert_eq!(
            r.header("content-length"),
            Some((last - first + 1).to_string().as_str()),
            "{spec}"
        );
        assert_eq!(r.header("etag"), Some(etag(&a).as_str()));
    }

    for spec in [
        format!("bytes={len}-"),
        format!("bytes={len}-{}", len + 10),
        "bytes=-0".into(),
    ] {
        let r = range(&spec);
        assert_eq!(r.status, 416, "{spec}");
        assert!(r.body.is_empty());
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{len}").as_str())
        );
    }

    // Several ranges, other units and bad syntax get the whole file.
    for spec in ["bytes=0-1,5-6", "items=0-5", "bytes=9-2", "bytes=x-"] {
        let r = range(spec);
        assert_eq!(r.status, 200, "{spec}");
        assert_eq!(r.body, bytes, "{spec}");
    }

    // If-Range: the range only holds for the current ETag.
    let tag = etag(&a);
    let r = request(
        addr,
        "GET",
        "/packages/a.ferry",
        &[("Range", "bytes=0-9"), ("If-Range", &tag)],
    );
    assert_eq!((r.status, r.body.len()), (206, 10));
    let r = request(
        addr,
        "GET",
        "/packages/a.ferry",
        &[("Range", "bytes=0-9"), ("If-Range", "\"stale\"")],
    );
    assert_eq!((r.status, r.body.len()), (200, len));

    // If-None-Match: the client has it.
    let r = request(addr, "GET", "/packages/a.ferry", &[("If-None-Match", &tag)]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(tag.as_str()));
}

#[test]
fn head_has_the_headers_and_no_body() {
    let (_dir, a, _) = two_packages();
    let len = std::fs::metadata(&a).unwrap().len();
    let reg = serve(&[&a], None);
    let r = request(reg.local_addr(), "HEAD", "/packages/a.ferry", &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("etag"), Some(etag(&a).as_str()));

    let r = request(
        reg.local_addr(),
        "HEAD",
        "/packages/a.ferry",
        &[("Range", "bytes=-10")],
    );
    assert_eq!(r.status, 206);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("10"));
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {}-{}/{len}", len - 10, len - 1).as_str())
    );
}

#[test]
fn unknown_names_are_404() {
    let (_dir, a, _) = two_packages();
    let reg = serve(&[&a], None);
    for path in [
        "/packages/nope.ferry",
        "/packages/",
        "/packages",
        "/nope",
        "/a.ferry",
    ] {
        let r = get(reg.local_addr(), path);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.body.is_empty(), "{path}");
    }
    let r = request(reg.local_addr(), "POST", "/packages/a.ferry", &[]);
    assert_eq!(r.status, 405);
}

#[test]
fn traversal_is_refused() {
    let (dir, a, _) = two_packages();
    // Files beside and above the served one must stay unreachable.
    std::fs::write(dir.path().join("secret.txt"), "SECRET").unwrap();
    let reg = serve(&[&a], None);
    for path in [
        "/packages/secret.txt",
        "/packages/../secret.txt",
        "/packages/..%2Fsecret.txt",
        "/packages/%2E%2E%2Fsecret.txt",
        "/packages/..",
        "/packages/.",
        "/packages/a.ferry/../secret.txt",
        "/packages/%2Fetc%2Fpasswd",
        "/../../../../etc/passwd",
        "/packages/..%5Csecret.txt",
    ] {
        let r = get(reg.local_addr(), path);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.body.is_empty(), "{path}");
    }
}

#[test]
fn token_is_required() {
    let (_dir, a, _) = two_packages();
    let reg = serve(&[&a], Some("s3cret-token-0123"));
    let addr = reg.local_addr();
    for path in ["/", "/packages/a.ferry", "/packages/nope", "/x"] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer s3cret-toke"),
            Some("Bearer s3cret-token-01232"),
            Some("Basic s3cret-token-0123"),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|v| ("Authorization", v)).into_iter().collect();
            let r = request(addr, "GET", path, &headers);
            assert_eq!(r.status, 401, "{path} {auth:?}");
            assert!(r.body.is_empty(), "{path} {auth:?}");
            assert_eq!(r.header("content-length"), Some("0"));
            assert!(r
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")));
        }
    }
    let ok = [("Authorization", "Bearer s3cret-token-0123")];
    assert_eq!(request(addr, "GET", "/", &ok).status, 200);
    let r = request(addr, "GET", "/packages/a.ferry", &ok);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, std::fs::read(&a).unwrap());
    assert_eq!(request(addr, "GET", "/packages/nope", &ok).status, 404);
}

fn bind(packages: Vec<PathBuf>, listen: &str, token: Option<&str>) -> TransportError {
    Registry::bind(RegistryConfig {
        packages,
        listen: listen.parse().unwrap(),
        token: token.map(|t| ferry_transport::Token::new(t).unwrap()),
    })
    .unwrap_err()
}

#[test]
fn start_up_errors_are_clear() {
    let (dir, a, _) = two_packages();

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = bind(vec![a.clone()], &addr, None);
    assert!(matches!(e, TransportError::Bind { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("cannot listen on {addr}: ")),
        "{msg}"
    );
    assert!(msg.contains("in use"), "{msg}");

    let copy = dir.path().join("sub");
    std::fs::create_dir(&copy).unwrap();
    let a2 = copy.join("a.ferry");
    std::fs::copy(&a, &a2).unwrap();
    let e = bind(vec![a.clone(), a2.clone()], "127.0.0.1:0", None);
    assert_eq!(
        e.to_string(),
        format!(
            "two packages are named a.ferry ({} and {}): the registry serves packages by file name; rename one",
            a.display(),
            a2.display()
        )
    );

    let bad = dir.path().join("bad.ferry");
    std::fs::copy(&a, &bad).unwrap();
    flip(&bad, 70); // inside the header checksum
    let e = bind(vec![a.clone(), bad.clone()], "127.0.0.1:0", None);
    assert!(matches!(e, TransportError::OpenPackage(_)), "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "cannot serve a package: {}: the package header is corrupt",
            bad.display()
        )),
        "{e}"
    );

    let e = bind(vec![dir.path().join("missing.ferry")], "127.0.0.1:0", None);
    assert!(e.to_string().contains("missing.ferry"), "{e}");

    let e = bind(vec![], "127.0.0.1:0", None);
    assert!(matches!(e, TransportError::NoPackages), "{e}");
    // Short, empty and odd tokens cannot even be made into a
    // RegistryConfig: see `Token::new` (and the CLI's `bad_input` tests).
    assert!(ferry_transport::Token::new("").is_err());
    assert!(ferry_transport::Token::new("two words two words").is_err());
    let _ = a;
}

#[test]
fn many_clients_at_once() {
    let (_dir, a, b) = two_packages();
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let reg = serve(&[&a, &b], None);
    let addr = reg.local_addr();
    std::thread::scope(|s| {
        for t in 0..16 {
            let (ba, bb) = (&ba, &bb);
            s.spawn(move || {
                for i in 0..5 {
                    let r = get(addr, "/packages/a.ferry");
                    assert_eq!(r.body, *ba, "thread {t} round {i}");
                    let first = (t * 997 + i * 131) % (bb.len() - 10);
                    let r = request(
                        addr,
                        "GET",
                        "/packages/b%20v2.ferry",
                        &[("Range", &format!("bytes={first}-{}", first + 9))],
                    );
                    assert_eq!(r.body, bb[first..first + 10], "thread {t} round {i}");
                }
            });
        }
    });
}

#[test]
fn the_served_file_is_the_one_checked_at_start() {
    let (dir, a, _) = two_packages();
    let before = std::fs::read(&a).unwrap();
    let reg = serve(&[&a], None);
    // Replacing the package (as `ferry package` does, by rename) does not
    // change what is served: the bytes keep matching the ETag.
    make_package(dir.path(), "a.ferry", 42);
    assert_ne!(std::fs::read(&a).unwrap(), before);
    let r = get(reg.local_addr(), "/packages/a.ferry");
    assert_eq!(r.body, before);
}

#[test]
fn stop_ends_the_server() {
    let (_dir, a, _) = two_packages();
    let reg = serve(&[&a], None);
    let addr = reg.local_addr();
    assert_eq!(get(addr, "/").status, 200);
    reg.stop().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// Clients that connect and say nothing hold at most the cap: one more is
/// closed at once, and once one goes a request is served again. Checked to
/// fail without the cap (the extra connection was then answered).
#[test]
fn connections_past_the_cap_are_closed() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let (_dir, a, _) = two_packages();
    let reg = Registry::bind(RegistryConfig {
        packages: vec![a],
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
    })
    .unwrap()
    .with_max_connections(2)
    .spawn()
    .unwrap();
    let addr = reg.local_addr();
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = extra.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(addr, "/").status, 200);
}

/// Sends `request` one byte at a time (with `send` false, sends nothing),
/// waiting the stream's read timeout for an answer after each, until the
/// server closes the connection: whether it did before the request was
/// all sent. An answer instead panics; so does still going after 20 s.
fn trickle_until_cut(s: &mut std::net::TcpStream, request: &[u8], send: bool) -> bool {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let started = Instant::now();
    let mut buf = [0u8; 512];
    for b in request {
        if send && s.write_all(&[*b]).is_err() {
            return true;
        }
        // EOF (or a reset) is the cut.
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => panic!("answered: {}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never cut off");
    }
    false
}

/// A client that sends its request headers one byte every 2 s is cut off
/// once `HEADER_DEADLINE` (10 s from its accept) has passed, though each
/// byte comes well within any per-read timeout (the whole request would
/// take over a minute); one that sends them at once is served. Checked to
/// fail without the deadline (the trickle then ran to the test's 20 s
/// limit).
#[test]
fn request_headers_trickled_byte_by_byte_are_cut_off_at_the_deadline() {
    use std::time::{Duration, Instant};
    let (_dir, a, _) = two_packages();
    let reg = Registry::bind(RegistryConfig {
        packages: vec![a],
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
    })
    .unwrap()
    .spawn()
    .unwrap();
    let addr = reg.local_addr();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let request =
        b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: a-slow-client\r\nConnection: close\r\n\r\n";
    let started = Instant::now();
    // Each byte waits 2 s (the read timeout) for an answer.
    let cut = trickle_until_cut(&mut s, request, true);
    assert!(cut, "the whole trickled request was read");
    let took = started.elapsed();
    assert!(
        took >= ferry_transport::HEADER_DEADLINE - Duration::from_millis(500)
            && took < ferry_transport::HEADER_DEADLINE + Duration::from_secs(4),
        "cut off after {took:?}, not at the {:?} deadline",
        ferry_transport::HEADER_DEADLINE
    );
    assert_eq!(get(addr, "/").status, 200);
}

/// The same deadline holds for the second request of a keep-alive
/// connection: one request sent at once is answered, then the next one's
/// headers trickled a byte every 2 s are cut off at the deadline from the
/// first answer, and so is a connection that then says nothing. Checked to
/// fail without it: `axum::serve` set no header timer, and the
/// listener's own deadline covered the first request only (the trickle
/// ran to the test's 20 s limit).
#[test]
fn a_keep_alive_connections_later_requests_have_the_deadline_too() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let (_dir, a, _) = two_packages();
    let reg = Registry::bind(RegistryConfig {
        packages: vec![a],
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
    })
    .unwrap()
    .spawn()
    .unwrap();
    let addr = reg.local_addr();
    let deadline = ferry_transport::HEADER_DEADLINE;
    // Reads one whole answer (headers and its Content-Length body).
    let answer = |s: &mut std::net::TcpStream| {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    };
    for trickle in [true, false] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(answer(&mut s).starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        let second = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: a-slow-client\r\n\r\n";
        let cut = trickle_until_cut(&mut s, second, trickle);
        assert!(
            cut,
            "the whole trickled request was read (trickle: {trickle})"
        );
        let took = started.elapsed();
        assert!(
            took >= deadline - Duration::from_millis(500)
                && took < deadline + Duration::from_secs(4),
            "cut off after {took:?}, not at the {deadline:?} deadline (trickle: {trickle})"
        );
    }
    assert_eq!(get(addr, "/").status, 200);
}
