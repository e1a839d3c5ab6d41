//! Migrations over TLS on loopback: a whole session (control, an offer, a
//! data channel carrying bytes both ways through two tunnels), and every refusal: plain text to a TLS listener, TLS to a
//! plain one, no client certificate under `--client-ca`, the wrong CA, a
//! certificate for another name, an expired one, a trickled handshake.
//! Each refusal hands the listener no migration. Without TLS on the
//! listener, the plain caller would be handed one (and the TLS callers
//! would fail in other ways than the checks expect).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::offer::tests::offer;
use super::tests::{listener_tls, token};
use super::*;
use crate::{tls_init, ClientTls, TlsFiles};

fn init(dir: &Path) -> TlsFiles {
    tls_init(dir, &[]).unwrap()
}

fn server_tls(f: &TlsFiles, client_ca: bool) -> ServerTls {
    ServerTls::from_files(
        &f.server_cert,
        &f.server_key,
        client_ca.then_some(f.ca_cert.as_path()),
    )
    .unwrap()
}

fn client(f: &TlsFiles, with_cert: bool) -> PeerClientTls {
    ClientTls {
        ca: Some(f.ca_cert.clone()),
        client_cert: with_cert.then(|| f.client_cert.clone()),
        client_key: with_cert.then(|| f.client_key.clone()),
    }
    .peer()
    .unwrap()
}

/// A server certificate signed by `f`'s CA is not possible (`tls init`
/// keeps no CA key): a CA of its own, and a leaf for `names` valid
/// `from..until` (years), written into `dir` as `ca.crt`, `leaf.crt`,
/// `leaf.key`.
fn own_ca_and_leaf(dir: &Path, names: &[&str], from: i32, until: i32) -> (PathBuf, ServerTls) {
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
    let mut leaf =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
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

/// A listener that hands each migration to the returned receiver.
fn serving(tls: &ServerTls) -> (Server, std::sync::mpsc::Receiver<Incoming>) {
    let (tx, rx) = channel();
    let tx = std::sync::Mutex::new(tx);
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &token(),
        Some(tls),
        move |i| {
            let _ = tx.lock().unwrap().send(i);
        },
    )
    .unwrap();
    (server, rx)
}

/// `n` bytes of a pattern that no run of the same length repeats soon.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8 ^ seed)
        .collect()
}

#[test]
fn a_session_runs_inside_mutual_tls_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(&dir.path().join("tls"));
    let (server, incoming) = serving(&server_tls(&f, true));
    let addr = server.local_addr().to_string();
    let ctls = client(&f, true);

    // The control connection and the offer.
    let dest = std::thread::spawn({
        let (addr, ctls) = (addr.clone(), ctls.clone());
        move || connect(&addr, &token(), Some(&ctls))
    });
    let mut inc = incoming.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(inc.control.is_tls());
    inc.control
        .send(&SourceMsg::Offer {
            session: inc.session.clone(),
            vm: offer(),
        })
        .unwrap();
    let (mut control, session, vm) = dest.join().unwrap().unwrap();
    assert!(control.is_tls());
    assert_eq!(vm.name, offer().name);
    control.send(&DestMsg::Ready).unwrap();
    assert!(matches!(
        inc.control.recv::<DestMsg>(Some(Duration::from_secs(5))),
        Ok(DestMsg::Ready)
    ));

    // A data channel, tunnelled on both sides: the source's engine holds
    // one end of a socket pair, the destination's tunnel dials its engine.
    let dst_sock = dir.path().join("dst.sock");
    let dst_engine = UnixListener::bind(&dst_sock).unwrap();
    let dst_stream =
        open_channel(&addr, &token(), Some(&ctls), &session, ChannelKind::State).unwrap();
    assert!(dst_stream.is_tls());
    let src_stream = inc
        .channel(ChannelKind::State, Duration::from_secs(10))
        .unwrap();
    assert!(src_stream.is_tls());
    // A TLS channel is never handed to the engine itself.
    let (a, src_tunnel) = attach(src_stream).unwrap();
    assert!(!src_tunnel.is_direct());
    let mut a = UnixStream::from(a);
    let dst_tunnel = Tunnel(UnixStream::connect(&dst_sock).unwrap())
        .start(dst_stream)
        .unwrap();
    let mut b = dst_engine.accept().unwrap().0;

    // 8 MiB one way and 1 MiB the other, at the same time, then each side
    // closes its sending half and sees the other's end.
    let (to_b, to_a) = (pattern(8 << 20, 3), pattern(1 << 20, 7));
    let send = |mut s: UnixStream, data: Vec<u8>| {
        std::thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let recv = |mut s: UnixStream| {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        })
    };
    let sends = [
        send(a.try_clone().unwrap(), to_b.clone()),
        send(b.try_clone().unwrap(), to_a.clone()),
    ];
    let (got_b, got_a) = (recv(b.try_clone().unwrap()), recv(a.try_clone().unwrap()));
    for s in sends {
        s.join().unwrap();
    }
    assert!(got_b.join().unwrap() == to_b, "A -> B arrived whole");
    assert!(got_a.join().unwrap() == to_a, "B -> A arrived whole");
    let Carried::Tunnel(t) = &src_tunnel.carried else {
        panic!("not tunnelled")
    };
    assert!(t.wait(Duration::from_secs(10)));
    assert!(dst_tunnel.wait(Duration::from_secs(10)));
    assert_eq!(src_tunnel.bytes(), (9 << 20) as u64);
    let _ = (&mut a, &mut b);
}

/// The error of `connect` to `addr`, which must be refused.
fn refused(addr: &str, tls: Option<&PeerClientTls>) -> MigrationError {
    match connect(addr, &token(), tls) {
        Ok(_) => panic!("connected"),
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "{e}");
            e
        }
    }
}

#[test]
fn plain_callers_missing_or_wrong_certificates_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(&dir.path().join("tls"));
    let (server, handed) = listener_tls(ServerLimits::default(), Some(&server_tls(&f, true)));
    let addr = server.local_addr().to_string();

    // Plain text to the TLS listener: one plain refusal line.
    let e = refused(&addr, None);
    assert!(
        matches!(&e, MigrationError::Refused { reason, .. } if reason.contains("speaks only TLS")),
        "{e}"
    );
    // No client certificate while the listener wants one.
    let e = refused(&addr, Some(&client(&f, false)));
    assert!(
        matches!(&e, MigrationError::Tls { .. }) && e.to_string().contains("--client-cert"),
        "{e}"
    );
    // A caller trusting another CA.
    let other = init(&dir.path().join("other"));
    let e = refused(&addr, Some(&client(&other, true)));
    assert!(
        e.to_string().contains("not signed by the --ca given"),
        "{e}"
    );
    // A client certificate from another CA.
    let mixed = ClientTls {
        ca: Some(f.ca_cert.clone()),
        client_cert: Some(other.client_cert.clone()),
        client_key: Some(other.client_key.clone()),
    }
    .peer()
    .unwrap();
    let e = refused(&addr, Some(&mixed));
    assert!(e.to_string().contains("--client-cert"), "{e}");
    assert_eq!(handed.load(Ordering::SeqCst), 0);

    // TLS to a plain listener: closed at once, named.
    let (plain, handed) = listener_tls(ServerLimits::default(), None);
    let started = Instant::now();
    let e = refused(&plain.local_addr().to_string(), Some(&client(&f, true)));
    assert!(e.to_string().contains("may not speak TLS"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(handed.load(Ordering::SeqCst), 0);
}

#[test]
fn a_certificate_for_another_name_or_out_of_date_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Valid now, but for another name than the address dialled.
    let (ca, tls) = own_ca_and_leaf(&dir.path().join("name"), &["peer.example"], 2024, 2099);
    let (server, handed) = listener_tls(ServerLimits::default(), Some(&tls));
    let trust = ClientTls {
        ca: Some(ca),
        ..ClientTls::default()
    }
    .peer()
    .unwrap();
    let e = refused(&server.local_addr().to_string(), Some(&trust));
    assert!(e.to_string().contains("does not name the address"), "{e}");
    assert_eq!(handed.load(Ordering::SeqCst), 0);

    // The right name, expired.
    let (ca, tls) = own_ca_and_leaf(&dir.path().join("old"), &["127.0.0.1"], 2020, 2021);
    let (server, handed) = listener_tls(ServerLimits::default(), Some(&tls));
    let trust = ClientTls {
        ca: Some(ca),
        ..ClientTls::default()
    }
    .peer()
    .unwrap();
    let e = refused(&server.local_addr().to_string(), Some(&trust));
    assert!(e.to_string().contains("expired"), "{e}");
    assert_eq!(handed.load(Ordering::SeqCst), 0);
}

#[test]
fn a_trickled_tls_handshake_is_cut_off_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(&dir.path().join("tls"));
    let limits = ServerLimits {
        handshake: Duration::from_secs(2),
        ..ServerLimits::default()
    };
    let (server, handed) = listener_tls(limits, Some(&server_tls(&f, false)));
    let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
    // A TLS record header, then one byte every 500 ms.
    let started = Instant::now();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 512];
    let cut = loop {
        assert!(started.elapsed() < Duration::from_secs(10), "never cut off");
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => {
                if s.write_all(&[0x01]).is_err() {
                    break true;
                }
            }
        }
    };
    assert!(cut);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "cut off after {took:?}, not at the 2 s deadline"
    );
    assert_eq!(handed.load(Ordering::SeqCst), 0);
    let _ = Arc::new(());
}
