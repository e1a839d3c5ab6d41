//! TLS between peers, on test hosts (network namespaces): a live migration
//! over mutual TLS while a client writes to Redis (no acknowledged write
//! lost, and neither the token nor the guest's memory seen in clear on the
//! wire), and the refusals, each one line naming the fix, with nothing
//! made on the destination: plain text sent to a TLS listener, a caller
//! without a client certificate under `--client-ca`, the wrong CA, a
//! certificate for another name, an expired certificate.
//!
//! Each fails without its defence: with a plain listener, the plain
//! caller would migrate and the capture would see the token and the
//! guest's memory; without `--client-ca`, the caller without a
//! certificate would migrate; without the certificate checks, the callers
//! trusting another CA or given the wrong or expired certificate would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_test_support::{describe, vm_lock, wait_until, FerryEnv, Host, TestHosts};
use ferry_transport::migration::{Server, ServerLimits};
use ferry_transport::{ServerTls, Token};

mod common;
use common::hosts::{registry, start_with_lines as start};
use common::kv::{in_netns, missing, writer, Redis, Writes};
use common::{env, recipe_package, stop};

const TOKEN: &str = "tls-test-token-0123456789";
const REDIS_PORT: u16 = 16379;
const PEER_PORT: u16 = 7100;
const REGISTRY_PORT: u16 = 7070;

/// `ferry tls init DIR --san SAN...` on `env`; DIR.
fn tls_init(env: &FerryEnv, name: &str, sans: &[String]) -> PathBuf {
    let dir = env.state.path().join(name);
    let mut args = vec!["tls".to_string(), "init".into(), dir.display().to_string()];
    for s in sans {
        args.extend(["--san".into(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.run(&args);
    assert!(out.status.success(), "{}", describe(&out));
    dir
}

fn p(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

/// `ferry peer --from FROM --name kv --token T EXTRA...` on `host`, which
/// must be refused: exit 3, one `ferry:` line containing `expect`, and no
/// VM made. The line.
fn refused(host: &Host, env: &FerryEnv, from: &str, extra: &[&str], expect: &str) -> String {
    let out = host
        .ferry(env)
        .args(["peer", "--from", from, "--name", "kv", "--token", TOKEN])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("ferry: ") && !l.starts_with("ferry: warning:"))
        .collect();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(lines.len(), 1, "one error line: {}", describe(&out));
    assert!(lines[0].contains(expect), "{expect:?} not in {}", lines[0]);
    assert!(
        !env.vm_dir("kv").exists(),
        "nothing made on the destination"
    );
    eprintln!("refused: {}", lines[0]);
    lines[0].to_string()
}

/// A migration listener of the library (what `peer --listen` runs) in
/// `host`'s namespace on `port`, with `tls`; it counts what it is handed.
fn library_listener(host: &Host, port: u16, tls: ServerTls) -> (Server, Arc<AtomicU64>) {
    let handed = Arc::new(AtomicU64::new(0));
    let h = handed.clone();
    let addr = SocketAddr::new(host.addr().into(), port);
    let server = in_netns(host.name(), move || {
        Server::bind_with(
            addr,
            &Token::new(TOKEN).unwrap(),
            Some(&tls),
            ServerLimits::default(),
            move |_| {
                h.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap()
    })
    .join()
    .unwrap();
    (server, handed)
}

/// A CA of its own and a server certificate for `names` valid in the years
/// `from..until`, in `dir`: (`ca.crt`, the listener's TLS).
fn own_ca_and_leaf(dir: &Path, names: &[String], from: i32, until: i32) -> (PathBuf, ServerTls) {
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(names.to_vec()).unwrap();
    leaf.not_before = date_time_ymd(from, 1, 1);
    leaf.not_after = date_time_ymd(until, 1, 1);
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.crt"),
        dir.join("leaf.crt"),
        dir.join("leaf.key"),
    );
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (
        ca_file,
        ServerTls::from_files(&cert_file, &key_file, None).unwrap(),
    )
}

/// Certificates a TLS client must refuse, served by the library's listener
/// on A and dialled by `ferry peer` on B; no VM is needed: each refusal
/// comes before the offer.
#[test]
fn a_peer_refuses_other_names_expired_certificates_and_other_cas() {
    let _limit = ferry_test_support::watchdog::time_limit(Duration::from_secs(120));
    let hosts = TestHosts::create(&["a", "b"]);
    let (a, b) = (&hosts["a"], &hosts["b"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (ea, eb) = (a.ferry_env(bin), b.ferry_env(bin));
    let a_addr = a.addr().to_string();
    let certs = tls_init(&ea, "certs", std::slice::from_ref(&a_addr));
    let other = tls_init(&ea, "other", std::slice::from_ref(&a_addr));
    let (ca, cert, key) = (
        p(&certs, "ca.crt"),
        p(&certs, "client.crt"),
        p(&certs, "client.key"),
    );
    let good = ServerTls::from_files(
        &certs.join("server.crt"),
        &certs.join("server.key"),
        Some(&certs.join("ca.crt")),
    )
    .unwrap();
    let (_good, handed_good) = library_listener(a, PEER_PORT, good);
    let from = format!("{a_addr}:{PEER_PORT}");

    // Plain text to the TLS listener.
    refused(
        b,
        &eb,
        &from,
        &["--insecure"],
        "speaks only TLS: pass --ca FILE",
    );
    // No client certificate, though the listener asks for one.
    refused(
        b,
        &eb,
        &from,
        &["--ca", &ca],
        "pass --client-cert and --client-key",
    );
    // Trusting another CA than the one that signed the listener's.
    let other_ca = p(&other, "ca.crt");
    refused(
        b,
        &eb,
        &from,
        &[
            "--ca",
            &other_ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
        "not signed by the --ca given",
    );
    // A client certificate from another CA.
    let (other_cert, other_key) = (p(&other, "client.crt"), p(&other, "client.key"));
    refused(
        b,
        &eb,
        &from,
        &[
            "--ca",
            &ca,
            "--client-cert",
            &other_cert,
            "--client-key",
            &other_key,
        ],
        "pass --client-cert and --client-key",
    );
    assert_eq!(handed_good.load(Ordering::SeqCst), 0);

    // A certificate valid now, signed by the CA given, for another name.
    let (name_ca, tls) = own_ca_and_leaf(
        &ea.state.path().join("name"),
        &["peer.example".into()],
        2024,
        2099,
    );
    let (_named, handed) = library_listener(a, PEER_PORT + 1, tls);
    let from = format!("{a_addr}:{}", PEER_PORT + 1);
    let name_ca = name_ca.display().to_string();
    refused(
        b,
        &eb,
        &from,
        &["--ca", &name_ca],
        "does not name the address dialled",
    );
    // The right name, expired.
    let (old_ca, tls) = own_ca_and_leaf(
        &ea.state.path().join("old"),
        std::slice::from_ref(&a_addr),
        2020,
        2021,
    );
    let (_old, handed_old) = library_listener(a, PEER_PORT + 2, tls);
    let from = format!("{a_addr}:{}", PEER_PORT + 2);
    let old_ca = old_ca.display().to_string();
    refused(b, &eb, &from, &["--ca", &old_ca], "certificate has expired");
    assert_eq!(
        handed.load(Ordering::SeqCst) + handed_old.load(Ordering::SeqCst),
        0
    );
}

/// What a packet capture on a host's interface saw.
#[derive(Default)]
struct Seen {
    bytes: u64,
    /// Which of the needles appeared on the wire.
    found: Vec<bool>,
}

/// Captures every packet on `host`'s interface (AF_PACKET) until `stop`
/// (and what is still queued then), and looks for each of `needles` in
/// what it saw. The thread only copies (a debug build cannot search at
/// the link's rate); the search runs once the capture ends.
fn capture(
    host: &Host,
    needles: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Seen> {
    let ifname = std::ffi::CString::new(host.interface()).unwrap();
    in_netns(host.name(), move || {
        let mut wire: Vec<u8> = Vec::with_capacity(256 << 20);
        // SAFETY: plain socket calls on a descriptor this closure owns and
        // closes; the structs passed live across each call.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            assert!(fd >= 0, "AF_PACKET socket");
            let index = libc::if_nametoindex(ifname.as_ptr());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = index as i32;
            let rc = libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "binding the capture");
            let size: libc::c_int = 64 << 20;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let mut buf = vec![0u8; 256 * 1024];
            // Once stopped: what is queued still counts, for up to 2 s
            // (other traffic never lets the queue run dry).
            let mut stopped: Option<std::time::Instant> = None;
            loop {
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n > 0 {
                    wire.extend_from_slice(&buf[..n as usize]);
                }
                if stop.load(Ordering::SeqCst) {
                    let since = *stopped.get_or_insert_with(std::time::Instant::now);
                    if n <= 0 || since.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
            libc::close(fd);
        }
        Seen {
            bytes: wire.len() as u64,
            found: needles.iter().map(|n| contains(&wire, n)).collect(),
        }
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let first = needle[0];
    let mut at = 0;
    while let Some(i) = hay[at..].iter().position(|b| *b == first) {
        if hay[at + i..].starts_with(needle) {
            return true;
        }
        at += i + 1;
    }
    false
}

#[test]
fn a_live_migration_over_mutual_tls_loses_no_write_and_shows_nothing_in_clear() {
    let _lock = vm_lock();
    let pkg = recipe_package(&env(), "redis");
    let hosts = TestHosts::create(&["r", "a", "b", "client"]);
    let (r, a, b) = (&hosts["r"], &hosts["a"], &hosts["b"]);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let (er, ea, eb) = (r.ferry_env(bin), a.ferry_env(bin), b.ferry_env(bin));
    let _registry = registry(r, &er, &pkg, REGISTRY_PORT, Some(TOKEN));
    let url = format!("http://{}:{REGISTRY_PORT}/", r.addr());
    let expose = format!("0.0.0.0:{REDIS_PORT}:6379");
    let listen = format!("0.0.0.0:{PEER_PORT}");
    let certs = tls_init(&ea, "certs", &[a.addr().to_string()]);
    let (ca, cert, key) = (
        p(&certs, "ca.crt"),
        p(&certs, "client.crt"),
        p(&certs, "client.key"),
    );
    let (server_cert, server_key) = (p(&certs, "server.crt"), p(&certs, "server.key"));

    // A serves its VM over mutual TLS only (--insecure is for the plain
    // registry between test hosts).
    let (mut on_a, _) = start(
        a,
        &ea,
        &[
            "peer",
            "--from",
            &url,
            "--name",
            "kv",
            "--token",
            TOKEN,
            "--expose",
            &expose,
            "--insecure",
            "--listen",
            &listen,
            "--tls-cert",
            &server_cert,
            "--tls-key",
            &server_key,
            "--client-ca",
            &ca,
        ],
        "serving VM",
    );
    // The guest's memory holds a marker.
    let marker = "ferry-guest-memory-marker-7f3a9c";
    let value = marker.repeat(200);
    let redis_a = SocketAddr::new(a.addr().into(), REDIS_PORT);
    let redis_b = SocketAddr::new(b.addr().into(), REDIS_PORT);
    let set = {
        let value = value.clone();
        in_netns(hosts["client"].name(), move || {
            let mut c = Redis::connect(redis_a).unwrap();
            c.send(&["SET", "marker", &value]).unwrap();
            c.reply().unwrap()
        })
    };
    assert_eq!(set.join().unwrap().as_deref(), Some("OK"));

    let from_a = format!("{}:{PEER_PORT}", a.addr());
    let needles = vec![TOKEN.as_bytes().to_vec(), marker.as_bytes().to_vec()];

    // A plain caller is refused, and the capture sees its token in clear:
    // the capture works.
    let stop_cap = Arc::new(AtomicBool::new(false));
    let cap = capture(b, needles.clone(), stop_cap.clone());
    std::thread::sleep(Duration::from_millis(300));
    refused(b, &eb, &from_a, &["--insecure"], "speaks only TLS");
    stop_cap.store(true, Ordering::SeqCst);
    assert!(
        cap.join().unwrap().found[0],
        "the capture saw the plain caller's token"
    );
    // A caller without a client certificate is refused.
    refused(b, &eb, &from_a, &["--ca", &ca], "--client-cert");
    assert!(on_a.try_wait().unwrap().is_none(), "A still serves");

    // The move over mutual TLS, while a client writes.
    let stop_w = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Writes::default()));
    let w = {
        let (stop_w, writes) = (stop_w.clone(), writes.clone());
        in_netns(hosts["client"].name(), move || {
            writer(vec![redis_a, redis_b], stop_w, writes)
        })
    };
    let acked = || writes.lock().unwrap().acked.len();
    wait_until(Duration::from_secs(30), "the first writes", || {
        (acked() > 50).then_some(())
    });
    let stop_cap = Arc::new(AtomicBool::new(false));
    let cap = capture(b, needles, stop_cap.clone());
    std::thread::sleep(Duration::from_millis(300));
    let (mut on_b, lines) = start(
        b,
        &eb,
        &[
            "peer",
            "--from",
            &from_a,
            "--name",
            "kv",
            "--token",
            TOKEN,
            "--expose",
            &expose,
            "--ca",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
        "migrated VM 'kv'",
    );
    eprintln!("B: {lines:?}");
    wait_until(Duration::from_secs(60), "A to exit after the move", || {
        on_a.try_wait().unwrap()
    });
    let before = acked();
    wait_until(Duration::from_secs(60), "writes on B", || {
        (acked() > before + 50).then_some(())
    });
    stop_cap.store(true, Ordering::SeqCst);
    let seen = cap.join().unwrap();
    stop_w.store(true, Ordering::SeqCst);
    w.join().unwrap();
    eprintln!("captured {} bytes on B during the move", seen.bytes);
    assert!(
        seen.bytes > 16 << 20,
        "the capture saw the move ({} bytes)",
        seen.bytes
    );
    assert!(!seen.found[0], "the token crossed the wire in clear");
    assert!(
        !seen.found[1],
        "the guest's memory crossed the wire in clear"
    );

    let writes = std::mem::take(&mut *writes.lock().unwrap());
    let lost = in_netns(hosts["client"].name(), {
        let acked = writes.acked.clone();
        move || missing(redis_b, &acked)
    })
    .join()
    .unwrap();
    eprintln!(
        "{} writes acknowledged, longest gap {:?}",
        writes.acked.len(),
        writes.longest_gap
    );
    assert!(lost.is_empty(), "{} acknowledged writes lost", lost.len());
    let out = stop(&mut on_b);
    assert!(out.status.success(), "{}", describe(&out));
}
