//! A migration tunnel between a real TCP connection and a real Unix socket,
//! and the copy it keeps of what the engine sent.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ferry_transport::migration::Tunnel;

/// A connected TCP pair: (the tunnel's end, the far end).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let far = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (near, _) = l.accept().unwrap();
    (near, far)
}

fn wait_for(path: &std::path::Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_recording_holds_exactly_what_the_engine_sent_once_it_closed() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("sent");
    let (near, mut far) = tcp_pair();
    let (mut engine, ours) = UnixStream::pair().unwrap();
    let handle = Tunnel::Connected(ours)
        .start_recording(near.into(), &record)
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    // The far end reads as the engine writes, as a destination does: a
    // data channel buffers little (`TUNNEL_UNSENT_LIMIT`, and the far
    // end's receive window), so writing a megabyte before reading would
    // block.
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut first = vec![0u8; 1_000_000];
        far.read_exact(&mut first).unwrap();
        first_tx.send(first).unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).unwrap();
        rest
    });
    engine.write_all(&data[..1_000_000]).unwrap();
    let mut got = first_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(!record.exists(), "no recording before the stream is whole");

    engine.write_all(&data[1_000_000..]).unwrap();
    engine.shutdown(std::net::Shutdown::Write).unwrap();
    got.extend(reader.join().unwrap());
    assert!(got == data, "the far end got the stream");
    assert!(wait_for(&record), "kept once the engine closed its side");
    assert!(std::fs::read(&record).unwrap() == data, "the copy is exact");
    assert!(handle.wait(Duration::from_secs(5)));
    assert_eq!(handle.bytes(), data.len() as u64);
}

#[test]
fn a_stream_cut_short_leaves_no_recording() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("sent");
    let (near, far) = tcp_pair();
    let (mut engine, ours) = UnixStream::pair().unwrap();
    let handle = Tunnel::Connected(ours)
        .start_recording(near.into(), &record)
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
    assert!(handle.wait(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!record.exists(), "an undelivered stream is not kept");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().contains("partial")),
        "no partial copy is left: {left:?}"
    );
}
