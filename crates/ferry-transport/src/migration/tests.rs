//! The control messages as a peer of this or another version sends them,
//! and the destination's first step ([`connect`]) against a scripted source.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use serde_json::json;

use super::offer::tests::{offer, offer_json};
use super::*;

fn decode(v: serde_json::Value) -> Result<SourceMsg, serde_json::Error> {
    serde_json::from_value(v)
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
                wire_bytes: 0
            }
        ),
        other => panic!("{other:?}"),
    }
    let stats = LiveStats {
        total_ms: 1,
        downtime_ms: 2,
        state_bytes: 3,
        wire_bytes: 4,
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

fn offer_msg(vm: serde_json::Value) -> serde_json::Value {
    json!({"type": "offer", "session": "s1", "vm": vm})
}

#[test]
fn connect_returns_a_checked_offer() {
    let (addr, source) = scripted_source(offer_msg(offer_json()));
    let (control, session, vm) = connect(&addr, "t").unwrap();
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
    let e = connect(&addr, "t").err().unwrap();
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
    let e = connect(&addr, "t").err().unwrap();
    assert!(matches!(e, MigrationError::Protocol(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("unreadable offer"), "{msg}");
    assert!(msg.contains("missing field `disk_size`"), "{msg}");
    assert!(source.join().unwrap().contains(r#""type":"abort""#));
}
