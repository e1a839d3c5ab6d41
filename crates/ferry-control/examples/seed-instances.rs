//! Fills a manager's store with synthetic instance records, for
//! `bench/control`'s listing benchmark: `seed-instances STORE_DIR N NODE`.
//! Run it while no manager uses the store.

use ferry_control::api::{Instance, InstanceState, Move};
use ferry_control::store::{InstanceRecord, Store};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, n, node] = args.as_slice() else {
        eprintln!("usage: seed-instances STORE_DIR N NODE");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N is a number");
    let store = Store::open(std::path::Path::new(dir)).expect("open the store");
    for i in 0..n {
        let rec = InstanceRecord {
            instance: Instance {
                name: format!("synthetic-{i:05}"),
                source: "http://127.0.0.1:7070/".into(),
                node: node.clone(),
                state: InstanceState::Running,
                reason: None,
                address: Some(format!("10.99.{}.{}:17000", i / 250, i % 250)),
                exposes: vec![format!("10.99.{}.{}:16379:6379", i / 250, i % 250)],
                memory_mib: 256,
                moves: vec![Move {
                    from: "node-a".into(),
                    to: node.clone(),
                    started_unix_ms: 1,
                    ended_unix_ms: Some(2),
                    ok: Some(true),
                    error: None,
                    downtime_ms: Some(30),
                }],
                created_unix: 1,
                last_error: None,
            },
            token: "0".repeat(32),
            pending_token: None,
            expose: vec!["16379:6379".into()],
        };
        store.put_instance(&rec).expect("write a record");
    }
    println!("{n} instances in {dir}");
}
