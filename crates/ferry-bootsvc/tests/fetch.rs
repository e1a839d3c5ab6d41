//! `fetch::fetch_boot` against the real service (in-process, on a free
//! port): what `ferry boot --from-bss` will rely on before it starts a VM.

use std::time::Duration;

use ferry_bootsvc::fetch::{fetch_boot, FetchBootError, FetchOptions};
use ferry_bootsvc::{BootService, BootServiceConfig, RunningBootService};
use ferry_test_support::watchdog::{time_limit, Watchdog};
use sha2::{Digest, Sha256};

/// Local HTTP only: a minute is plenty.
fn limit() -> Watchdog {
    time_limit(Duration::from_secs(60))
}

struct Fixture {
    _service: RunningBootService,
    url: String,
    store: tempfile::TempDir,
    out: tempfile::TempDir,
}

fn service() -> Fixture {
    let store = tempfile::tempdir().unwrap();
    let svc = BootService::bind(BootServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: store.path().to_path_buf(),
        token: None,
        advertise: None,
    })
    .unwrap();
    let url = svc.advertise().to_string();
    Fixture {
        _service: svc.spawn().unwrap(),
        url,
        store,
        out: tempfile::tempdir().unwrap(),
    }
}

fn put_boot(url: &str, body: serde_json::Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    agent
        .put(&format!("{url}/boot/v1/bootparameters"))
        .send(serde_json::to_vec(&body).unwrap().as_slice())
        .unwrap();
}

fn opts(f: &Fixture, mac: &str) -> FetchOptions {
    FetchOptions {
        url: f.url.clone(),
        mac: mac.into(),
        dest: f.out.path().join("boot"),
        attempts: 3,
        host_alias: None,
        first_delay: Duration::from_millis(20),
    }
}

fn files(f: &Fixture) -> (Vec<u8>, String) {
    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(f.store.path().join("files/vmlinuz"), &kernel).unwrap();
    std::fs::write(f.store.path().join("files/initrd"), b"initrd bytes").unwrap();
    let digest = hex::encode(Sha256::digest(&kernel));
    (kernel, digest)
}

#[test]
fn kernel_and_initrd_arrive_verified_with_the_params() {
    let _limit = limit();
    let f = service();
    let (kernel, digest) = files(&f);
    let u = &f.url;
    put_boot(
        u,
        serde_json::json!({"macs":["02:00:00:00:00:01"],"params":"console=ttyS0",
        "kernel": format!("{u}/files/vmlinuz#sha256={digest}"), "initrd": format!("{u}/files/initrd")}),
    );
    let got = fetch_boot(&opts(&f, "02:00:00:00:00:01"), |_, _, _| {}).unwrap();
    assert_eq!(std::fs::read(&got.kernel).unwrap(), kernel);
    assert_eq!(std::fs::read(got.initrd.unwrap()).unwrap(), b"initrd bytes");
    assert!(
        got.params.starts_with("initrd=initrd console=ttyS0 "),
        "{}",
        got.params
    );
    assert!(
        got.params.contains(&format!(
            "ds=nocloud-net;s={u}/cloud-init/02:00:00:00:00:01/"
        )),
        "{}",
        got.params
    );
}

#[test]
fn a_wrong_digest_a_missing_kernel_and_an_unknown_mac_are_final() {
    let _limit = limit();
    let f = service();
    let (_, digest) = files(&f);
    let u = &f.url;
    let wrong = digest.replace(&digest[..1], if &digest[..1] == "0" { "1" } else { "0" });
    put_boot(
        u,
        serde_json::json!({"macs":["02:00:00:00:00:02"],"kernel": format!("{u}/files/vmlinuz#sha256={wrong}")}),
    );
    put_boot(
        u,
        serde_json::json!({"macs":["02:00:00:00:00:03"],"kernel": format!("{u}/files/missing")}),
    );
    let mut retries = 0;
    match fetch_boot(&opts(&f, "02:00:00:00:00:02"), |_, _, _| retries += 1) {
        Err(FetchBootError::DigestMismatch { actual, .. }) => assert_eq!(actual, digest),
        other => panic!("{other:?}"),
    }
    assert!(
        !f.out.path().join("boot/kernel").exists(),
        "a kernel that failed its check stays unused"
    );
    match fetch_boot(&opts(&f, "02:00:00:00:00:03"), |_, _, _| retries += 1) {
        Err(FetchBootError::Http { status: 404, .. }) => {}
        other => panic!("{other:?}"),
    }
    match fetch_boot(&opts(&f, "02:00:00:00:00:09"), |_, _, _| retries += 1) {
        Err(e @ FetchBootError::NoBootData { .. }) => {
            assert!(e.to_string().contains("02:00:00:00:00:09"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(retries, 0, "a definite answer is not retried");
    assert!(matches!(
        fetch_boot(&opts(&f, "nope"), |_, _, _| {}),
        Err(FetchBootError::BadMac(_))
    ));
}

#[test]
fn a_service_that_is_down_is_retried_with_backoff_then_named() {
    let _limit = limit();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = tempfile::tempdir().unwrap();
    let mut delays = Vec::new();
    let started = std::time::Instant::now();
    let err = fetch_boot(
        &FetchOptions {
            url: format!("http://127.0.0.1:{port}"),
            mac: "02:00:00:00:00:01".into(),
            dest: out.path().to_path_buf(),
            attempts: 3,
            host_alias: None,
            first_delay: Duration::from_millis(50),
        },
        |_, d, _| delays.push(d),
    )
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        delays,
        [Duration::from_millis(50), Duration::from_millis(100)]
    );
    match err {
        FetchBootError::ServiceDown { attempts: 3, .. } => {}
        other => panic!("{other:?}"),
    }
}
