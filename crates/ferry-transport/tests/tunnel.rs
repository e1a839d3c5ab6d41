//! A migration tunnel between a real TCP connection and a real Unix socket:
//! what a TLS data channel's engine talks through.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ferry_transport::migration::{ChannelKind, DataChannel, Tunnel};

/// A connected TCP pair: (the tunnel's end, the far end).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let far = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (near, _) = l.accept().unwrap();
    (near, far)
}

#[test]
fn a_tunnel_carries_exactly_what_the_engine_sent_and_counts_it() {
    let (near, mut far) = tcp_pair();
    let (mut engine, ours) = UnixStream::pair().unwrap();
    let handle = Tunnel(ours)
        .start(DataChannel::new(near.into(), ChannelKind::State))
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    // The far end reads as the engine writes, as a destination does: a
    // data channel buffers little (`TUNNEL_UNSENT_LIMIT`, and the far
    // end's receive window), so writing it all before reading would block.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        far.read_to_end(&mut got).unwrap();
        far.write_all(b"done").unwrap();
        got
    });
    engine.write_all(&data).unwrap();
    engine.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(reader.join().unwrap() == data, "the far end got the stream");
    let mut back = Vec::new();
    engine
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    engine.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"done", "and the engine the far end's answer");
    assert!(handle.wait(Duration::from_secs(5)), "both directions ended");
    assert_eq!(handle.bytes(), data.len() as u64 + 4);
}

#[test]
fn a_far_end_gone_ends_the_tunnel() {
    let (near, far) = tcp_pair();
    let (mut engine, ours) = UnixStream::pair().unwrap();
    let handle = Tunnel(ours)
        .start(DataChannel::new(near.into(), ChannelKind::State))
        .unwrap();
    // The far end goes away: the tunnel cannot deliver the stream.
    drop(far);
    let chunk = vec![1u8; 1 << 20];
    for _ in 0..64 {
        if engine.write_all(&chunk).is_err() {
            break;
        }
    }
    drop(engine);
    assert!(handle.wait(Duration::from_secs(10)), "the tunnel ended");
}
