//! Load generator for `bench/bootsvc`: C client threads, each with its own
//! keep-alive connection, GET URLs for S seconds, as a cluster's nodes do
//! at power-on; prints one line `requests=N errors=E seconds=S rps=R`.
//!
//! Usage: bootsvc-load URL_TEMPLATE MACS_FILE CONNECTIONS SECONDS
//!
//! `{mac}` in URL_TEMPLATE is replaced by MACs from MACS_FILE (one a line),
//! taken round-robin, so every request asks about another node.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: bootsvc-load URL_TEMPLATE MACS_FILE CONNECTIONS SECONDS");
        std::process::exit(2);
    }
    let template = args[1].clone();
    let macs: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(&args[2])
            .expect("read the MAC list")
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect(),
    );
    let connections: usize = args[3].parse().expect("CONNECTIONS is a number");
    let seconds: f64 = args[4].parse().expect("SECONDS is a number");
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|t| {
            let (template, macs, ok, errors, stop) = (
                template.clone(),
                macs.clone(),
                ok.clone(),
                errors.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_config(
                    ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(10)))
                        .build(),
                );
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let url = template.replace("{mac}", &macs[i % macs.len()]);
                    i += connections;
                    match agent.get(&url).call() {
                        Ok(mut r) if r.status() == 200 => {
                            let _ = r.body_mut().read_to_vec();
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    println!(
        "requests={n} errors={} seconds={elapsed:.2} rps={:.0}",
        errors.load(Ordering::Relaxed),
        n as f64 / elapsed
    );
}
