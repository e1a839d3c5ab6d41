//! The control messages as a peer of this or another version sends them,
//! and the destination's first step ([`connect`]) against a scripted source.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use serde_json::json;

use super::offer::tests::{offer, offer_json};
use super::*;

fn decode(v: serde_json::Value) -> Result<SourceMsg, serde_json::Error> {
    serde_json::from_value(v)
}

#[test]
fn a_hello_never_shows_its_token() {
    let hello = Hello::Control {
        v: 1,
        token: "migrate-token-0123".into(),
    };
    assert!(!format!("{hello:?}").contains("migrate-token"));
    let hello = Hello::Channel {
        v: 1,
        token: "migrate-token-0123".into(),
        session: "s".into(),
        channel: ChannelKind::State,
    };
    assert!(!format!("{hello:?}").contains("migrate-token"));
}

#[test]
fn an_offer_round_trips() {
    let msg = SourceMsg::Offer {
        session: "s1".into(),
        vm: offer(),
    };
    let line = serde_json::to_string(&msg).unwrap();
    assert!(line.starts_with(r#"{"type":"offer","session":"s1","vm":{"name":"redis-1a2b""#));
    match serde_json::from_str(&line).unwrap() {
        SourceMsg::Offer { session, vm } => {
            assert_eq!(session, "s1");
            assert_eq!(vm, offer());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn fields_from_a_newer_peer_are_ignored() {
    let mut vm = offer_json();
    vm["compression"] = json!("zstd");
    vm["kernel"]["mirror"] = json!("http://example.com/k");
    vm["meta"]["future"] = json!({"a": 1});
    let msg = json!({"type": "offer", "session": "s1", "vm": vm, "priority": 3});
    match decode(msg).unwrap() {
        SourceMsg::Offer { vm, .. } => assert_eq!(vm, offer()),
        other => panic!("{other:?}"),
    }
    let msg = json!({"type": "switch", "stats": {
        "total_ms": 900, "downtime_ms": 40, "state_bytes": 1, "wire_bytes": 2, "dirty_rate": 7
    }});
    assert!(matches!(decode(msg).unwrap(), SourceMsg::Switch { .. }));
}

#[test]
fn a_missing_field_is_refused_and_named() {
    for (path, field) in [
        (&["disk_size"][..], "disk_size"),
        (&["kernel"][..], "kernel"),
        (&["initramfs", "sha256"][..], "sha256"),
        (&["meta", "provenance"][..], "provenance"),
        (&["meta"][..], "meta"),
    ] {
        let mut vm = offer_json();
        let (last, parents) = path.split_last().unwrap();
        let mut at = &mut vm;
        for p in parents {
            at = &mut at[*p];
        }
        at.as_object_mut().unwrap().remove(*last);
        let e = decode(json!({"type": "offer", "session": "s", "vm": vm})).unwrap_err();
        assert!(
            e.to_string().contains(&format!("missing field `{field}`")),
            "{e}"
        );
    }
    let e =
        decode(json!({"type": "switch", "stats": {"total_ms": 1, "state_bytes": 1}})).unwrap_err();
    assert!(e.to_string().contains("missing field `downtime_ms`"), "{e}");
}

#[test]
fn stats_without_wire_bytes_are_read() {
    // What a source from before wire_bytes sends.
    let msg =
        json!({"type": "switch", "stats": {"total_ms": 900, "downtime_ms": 40, "state_bytes": 5}});
    match decode(msg).unwrap() {
        SourceMsg::Switch { stats } => assert_eq!(
            stats,
            LiveStats {
                total_ms: 900,
                downtime_ms: 40,
                state_bytes: 5,
                wire_bytes: 0,
                downtime_limit_ms: 0,
                throttle_pct: 0
            }
        ),
        other => panic!("{other:?}"),
    }
    let stats = LiveStats {
        total_ms: 1,
        downtime_ms: 2,
        state_bytes: 3,
        wire_bytes: 4,
        downtime_limit_ms: 15,
        throttle_pct: 40,
    };
    let line = serde_json::to_string(&SourceMsg::Switch {
        stats: stats.clone(),
    })
    .unwrap();
    match serde_json::from_str(&line).unwrap() {
        SourceMsg::Switch { stats: back } => assert_eq!(back, stats),
        other => panic!("{other:?}"),
    }
}

/// A source that answers the hello with `offer` (one JSON line) and
/// returns what the destination said next (or "" if it closed).
fn scripted_source(offer: serde_json::Value) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let source = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(r#""type":"control""#), "{line}");
        let mut out = serde_json::to_vec(&offer).unwrap();
        out.push(b'\n');
        (&stream).write_all(&out).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        line
    });
    (addr, source)
}

/// A token good enough to send.
pub(super) fn token() -> Token {
    Token::new("migrate-token-0123").unwrap()
}

fn offer_msg(vm: serde_json::Value) -> serde_json::Value {
    json!({"type": "offer", "session": "s1", "vm": vm})
}

#[test]
fn connect_returns_a_checked_offer() {
    let (addr, source) = scripted_source(offer_msg(offer_json()));
    let (control, session, vm) = connect(&addr, &token(), None).unwrap();
    assert_eq!(session, "s1");
    assert_eq!(vm, offer());
    drop(control);
    assert_eq!(source.join().unwrap(), "");
}

#[test]
fn connect_refuses_a_path_for_a_digest_and_tells_the_source() {
    let mut vm = offer_json();
    vm["kernel"]["sha256"] = json!("../../etc/passwd");
    let (addr, source) = scripted_source(offer_msg(vm));
    let e = connect(&addr, &token(), None).err().unwrap();
    assert!(matches!(e, MigrationError::Protocol(_)), "{e:?}");
    assert!(
        e.to_string().contains("kernel digest \"../../etc/passwd\""),
        "{e}"
    );
    let told = source.join().unwrap();
    let told: DestMsg = serde_json::from_str(&told).unwrap();
    assert!(
        matches!(&told, DestMsg::Abort { reason } if reason.contains("kernel digest")),
        "{told:?}"
    );
}

#[test]
fn connect_names_a_missing_field() {
    let mut vm = offer_json();
    vm.as_object_mut().unwrap().remove("disk_size");
    let (addr, source) = scripted_source(offer_msg(vm));
    let e = connect(&addr, &token(), None).err().unwrap();
    assert!(matches!(e, MigrationError::Protocol(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("unreadable offer"), "{msg}");
    assert!(msg.contains("missing field `disk_size`"), "{msg}");
    assert!(source.join().unwrap().contains(r#""type":"abort""#));
}

// ---- hostile callers of the source's listener, and hostile sources ----
//
// Each was checked to fail without its defence by reverting it once
// locally: the per-read hello timeout (the trickled hello then stayed
// open past 20 s), no handshake cap (the 65th connection then waited for
// its hello), and `read_line` without MAX_LINE (the oversized offer was
// read whole and reported as unreadable JSON instead).

/// A listener that counts the migrations it is handed.
fn listener(limits: ServerLimits) -> (Server, Arc<AtomicU64>) {
    listener_tls(limits, None)
}

/// [`listener`], over TLS with `tls`.
pub(super) fn listener_tls(
    limits: ServerLimits,
    tls: Option<&ServerTls>,
) -> (Server, Arc<AtomicU64>) {
    let handed = Arc::new(AtomicU64::new(0));
    let h = handed.clone();
    let server = Server::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        &token(),
        tls,
        limits,
        move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        },
    )
    .unwrap();
    (server, handed)
}

/// Whether the listener closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a refusal line, then EOF
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn a_hello_trickled_byte_by_byte_is_cut_off_at_the_deadline() {
    let (server, handed) = listener(ServerLimits::default());
    let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
    let hello = br#"{"type":"control","v":1,"token":"migrate-token-0123"}"#;
    let started = Instant::now();
    // One byte every 3 s: each read comes well within any per-read
    // timeout, but the whole hello would take minutes.
    let mut cut = false;
    for b in hello.iter() {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        if closed_within(&mut s, Duration::from_secs(3)) {
            cut = true;
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never cut off");
    }
    assert!(cut, "the whole trickled hello was read");
    let took = started.elapsed();
    assert!(
        took >= HANDSHAKE_DEADLINE - Duration::from_millis(500) && took < Duration::from_secs(16),
        "cut off after {took:?}, not at the {HANDSHAKE_DEADLINE:?} deadline"
    );
    assert_eq!(handed.load(Ordering::SeqCst), 0);
}

#[test]
fn connections_past_the_cap_are_closed_at_once_and_a_wrong_token_refused() {
    let limits = ServerLimits {
        handshake: Duration::from_secs(30),
        max_handshakes: 4,
    };
    let (server, handed) = listener(limits);
    let addr = server.local_addr();
    // Four idle callers hold every handshake slot.
    let idle: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fifth = std::net::TcpStream::connect(addr).unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(5)),
        "a connection past the cap is closed at once"
    );
    // Once they go, a caller is served again: a wrong and an empty token
    // are refused with one line, before anything of the VM is sent.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    for t in ["wrong-token-0123456", ""] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        writeln!(s, r#"{{"type":"control","v":1,"token":"{t}"}}"#).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let msg: SourceMsg = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(&msg, SourceMsg::Refused { reason } if reason.starts_with("wrong token")),
            "{msg:?}"
        );
        assert!(closed_within(&mut s, Duration::from_secs(5)));
    }
    assert_eq!(handed.load(Ordering::SeqCst), 0);
    // The right token is handed on.
    let (_c, _) = {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        writeln!(
            s,
            r#"{{"type":"control","v":1,"token":"migrate-token-0123"}}"#
        )
        .unwrap();
        (s, ())
    };
    let t = Instant::now();
    while handed.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(handed.load(Ordering::SeqCst), 1);
}

#[test]
fn an_oversized_control_line_is_refused() {
    // An offer line of MAX_LINE + 1 MiB of padding, without a newline
    // until the end: refused once MAX_LINE is passed.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let source = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let pad = vec![b' '; MAX_LINE + (1 << 20)];
        let _ = (&stream).write_all(&pad);
        let _ = (&stream).write_all(b"\n");
    });
    let e = connect(&addr, &token(), None).err().unwrap();
    assert!(matches!(e, MigrationError::Protocol(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("sent a control line longer than {MAX_LINE} bytes")),
        "{e}"
    );
    let _ = source.join();
}

/// The bounds that keep a live copy's source from running megabytes ahead
/// of its destination are on the state's channel (see
/// `TUNNEL_UNSENT_LIMIT` and `bound_receive_queue`); the disk's channel is
/// left to the kernel's sizing (see `size_buffers`).
#[test]
fn a_tunnel_bounds_what_waits_unsent_or_unread_in_the_states_socket() {
    use std::os::fd::AsRawFd;
    let tunnel_options = |kind| {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("engine.sock");
        let engine = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (_far, _) = server.accept().unwrap();
        let handle = Tunnel(std::os::unix::net::UnixStream::connect(&sock).unwrap())
            .start(DataChannel::new(PeerStream::plain(tcp), kind))
            .unwrap();
        let (_engine_side, _) = engine.accept().unwrap();
        let option = |level, name| {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt on the tunnel's own socket into a local
            // int of the size given.
            let rc = unsafe {
                libc::getsockopt(
                    handle.tcp.as_raw_fd(),
                    level,
                    name,
                    std::ptr::from_mut(&mut value).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            value as u32
        };
        (
            option(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
            option(libc::SOL_SOCKET, libc::SO_RCVBUF),
        )
    };
    let (unsent, receive) = tunnel_options(ChannelKind::State);
    assert_eq!(unsent, TUNNEL_UNSENT_LIMIT);
    // On loopback a round trip carries almost nothing: the least window,
    // which Linux reports doubled.
    assert_eq!(receive, 2 * TUNNEL_RECEIVE_WINDOW_MIN);
    let (unsent, receive) = tunnel_options(ChannelKind::Disk);
    assert_ne!(unsent, TUNNEL_UNSENT_LIMIT, "the disk's unsent queue");
    assert_ne!(receive, 2 * TUNNEL_RECEIVE_WINDOW_MIN, "the disk's window");
}

/// A plain data channel is the engine's own connection: what the engine
/// writes on the descriptor it was handed reaches the far end with no
/// tunnel between and is counted (the hello before it is not), the socket
/// keeps the bounds a tunnel's has and no deadline from the hello's read,
/// and dropping the handle cuts the connection though the engine still
/// holds its descriptor.
#[test]
fn a_plain_channel_is_handed_to_the_engine_itself() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    let (mut far, _) = server.accept().unwrap();
    (&tcp).write_all(b"a hello\n").unwrap();
    let mut hello = [0u8; 8];
    far.read_exact(&mut hello).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();

    let (fd, handle) =
        attach(DataChannel::new(PeerStream::plain(tcp), ChannelKind::State)).unwrap();
    assert!(handle.is_direct());
    let mut engine = TcpStream::from(fd);
    assert_eq!(engine.read_timeout().unwrap(), None, "the hello's deadline");
    let option = |name| {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on the engine's socket into a local int of
        // the size given.
        let rc = unsafe {
            libc::getsockopt(
                engine.as_raw_fd(),
                libc::IPPROTO_TCP,
                name,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value as u32
    };
    assert_eq!(option(libc::TCP_NOTSENT_LOWAT), TUNNEL_UNSENT_LIMIT);

    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 1_000_000];
        far.read_exact(&mut got).unwrap();
        far.write_all(&[7u8; 1000]).unwrap();
        (far, got)
    });
    engine.write_all(&data).unwrap();
    let (mut far, got) = reader.join().unwrap();
    assert!(got == data, "the far end got what the engine wrote");
    let mut back = [0u8; 1000];
    engine.read_exact(&mut back).unwrap();
    // Acknowledgements come back on their own time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.bytes() != 1_001_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(handle.bytes(), 1_001_000);

    drop(handle);
    far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = [0u8; 1];
    assert_eq!(far.read(&mut rest).unwrap(), 0, "cut by the handle's drop");
    drop(engine);
}
