//! The runtime as a library, through its public API alone (no CLI, no
//! signals): boot → package → run → suspend → run again → stop over the
//! control socket, collecting the typed events each step reports.

use std::time::{Duration, Instant};

use ferry_engine::AccelChoice;
use ferry_qemu::QemuEngine;
use ferry_runtime::control::{call, ControlReply, ControlRequest};
use ferry_runtime::events::{Collect, Event};
use ferry_runtime::ops::{self, BootOptions, BootSource, PackageOptions, RunOptions};
use ferry_runtime::owner::Outcome;
use ferry_runtime::vm::NetChoice;
use ferry_runtime::vmdir::files;
use ferry_runtime::{Cancel, Paths};
use ferry_test_support::{
    blueprint, cache_dir, qemu_pids, raw_control_request, vm_lock, wait_until,
};

fn paths(state: &std::path::Path) -> Paths {
    Paths {
        state: state.to_path_buf(),
        cache: cache_dir(),
        net_prefix: "ferry".into(),
    }
}

fn has(events: &Collect, pred: impl Fn(&Event) -> bool) -> bool {
    events.events().iter().any(pred)
}

fn exec(paths: &Paths, vm: &str, script: &str) -> String {
    let out = ops::exec(
        paths,
        vm,
        vec!["sh".into(), "-c".into(), script.into()],
        None,
        Some(Duration::from_secs(20)),
    )
    .expect("exec");
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `ops::run` on a thread until `stop` returns, then returns its
/// outcome and events.
fn run_until<T>(
    engine: &QemuEngine,
    paths: &Paths,
    package: &std::path::Path,
    name: &str,
    stop: impl FnOnce(&Collect, &Cancel) -> T,
) -> (Outcome, Vec<Event>, T) {
    let events = Collect::default();
    let cancel = Cancel::new();
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            ops::run(
                engine,
                paths,
                RunOptions {
                    package: package.to_path_buf(),
                    name: Some(name.into()),
                    clone: false,
                    accel: AccelChoice::Auto,
                    console: None,
                    input: None,
                    started: Instant::now(),
                    net: NetChoice::None,
                    trust: Default::default(),
                },
                &events,
                &cancel,
            )
        });
        // A failed check must not leave the VM running (and this scope
        // waiting for it forever): cancel it, then fail.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(Duration::from_secs(120), "the VM to be live", || {
                if running.is_finished() {
                    panic!("run ended early: {:?}", events.events());
                }
                has(&events, |e| matches!(e, Event::Live { .. })).then_some(())
            });
            stop(&events, &cancel)
        }));
        let t = match checked {
            Ok(t) => t,
            Err(panic) => {
                cancel.cancel();
                let _ = running.join();
                std::panic::resume_unwind(panic);
            }
        };
        let outcome = running.join().expect("run thread").expect("run");
        (outcome, events.events(), t)
    })
}

#[test]
fn boot_package_run_suspend_resume_through_the_library() {
    let _lock = vm_lock();
    let state = tempfile::tempdir().unwrap();
    let paths = paths(state.path());
    let engine = QemuEngine::new("qemu-system-x86_64", &paths.cache).unwrap();
    let tiny = blueprint("tiny");

    // boot: live, then shut down; the events say so, in order.
    let events = Collect::default();
    let outcome = ops::boot(
        &engine,
        &paths,
        &BootOptions {
            source: BootSource::Blueprint(tiny.clone()),
            name: Some("lib-boot".into()),
            memory_mib: None,
            cpus: None,
            accel: AccelChoice::Auto,
            exit_when_live: true,
            live_timeout: None,
            console: None,
            started: Instant::now(),
            net: NetChoice::None,
        },
        &events,
        &Cancel::new(),
    )
    .unwrap();
    assert_eq!(outcome, Outcome::ShutDown);
    let seen = events.events();
    let accel = seen.iter().position(|e| matches!(e, Event::Accel { .. }));
    let live = seen.iter().position(|e| matches!(e, Event::Live { .. }));
    assert!(
        accel.is_some() && live.is_some() && accel < live,
        "{seen:?}"
    );
    // The breakdown starts with what came before the engine.
    let planned = seen
        .iter()
        .position(|e| matches!(e, Event::Phase { phase, .. } if phase == "planned"));
    assert!(planned.is_some() && planned < accel, "{seen:?}");
    assert!(qemu_pids("lib-boot").is_empty());
    assert!(!paths.vms().join("lib-boot").exists());

    // package.
    let package = state.path().join("tiny.ferry");
    let events = Collect::default();
    let packaged = ops::package(
        &engine,
        &paths,
        &PackageOptions {
            blueprint: tiny,
            out: package.clone(),
            memory_mib: Some(256),
            cpus: None,
            accel: AccelChoice::Auto,
            live_timeout: None,
            console: None,
            net: NetChoice::None,
            sign: None,
        },
        &events,
        &Cancel::new(),
    )
    .unwrap();
    assert_eq!(packaged.path, package);
    assert!(packaged.file_bytes > 0 && packaged.memory_mib == 256);
    assert!(has(&events, |e| matches!(e, Event::Snapshotting { .. })));
    assert!(has(&events, |e| matches!(e, Event::Packaged { .. })));

    // run, write to RAM and disk, cancel: suspended into the package.
    let (outcome, seen, _) = run_until(&engine, &paths, &package, "lib-run", |_, cancel| {
        exec(
            &paths,
            "lib-run",
            "echo kept > /tmp/marker; echo disk > /root/on-disk; sync",
        );
        cancel.cancel();
    });
    assert!(
        matches!(&outcome, Outcome::Suspended { path, .. } if *path == package),
        "{outcome:?}"
    );
    assert!(seen.iter().any(|e| matches!(e, Event::Resumed { .. })));
    assert!(seen.iter().any(|e| matches!(e, Event::Suspended { .. })));
    let meta = ops::inspect(&package, true).unwrap().meta.unwrap();
    assert_eq!(meta.generation, 1);

    // run again: RAM and disk as they were; this time stopped through the
    // control socket, as `ferry stop` does for any owner.
    let (outcome, _, reply) = run_until(&engine, &paths, &package, "lib-run", |_, _| {
        assert_eq!(exec(&paths, "lib-run", "cat /tmp/marker"), "kept");
        assert_eq!(exec(&paths, "lib-run", "cat /root/on-disk"), "disk");
        let socket = paths.vms().join("lib-run").join(files::CONTROL);
        // The control API, request by request, as every owner serves it.
        match call(&socket, &ControlRequest::Status, Duration::from_secs(10)).unwrap() {
            ControlReply::Status(s) => {
                assert_eq!(s.name, "lib-run");
                assert_eq!(s.state, "running");
                assert!(s.live);
                assert_eq!(s.pid, std::process::id());
            }
            other => panic!("status: {other:?}"),
        }
        for bad in [r#"{"op":"frobnicate"}"#, "not json", r#"{"op":"exec"}"#] {
            let reply = raw_control_request(&socket, bad);
            assert!(
                reply.contains(r#""type":"error""#) && reply.contains("bad request"),
                "{bad}: {reply}"
            );
        }
        call(
            &socket,
            &ControlRequest::Stop { discard: false },
            Duration::from_secs(120),
        )
        .unwrap()
    });
    assert!(
        matches!(&reply, ControlReply::Stopped { state, .. } if state == "suspended"),
        "{reply:?}"
    );
    assert!(matches!(outcome, Outcome::Suspended { .. }), "{outcome:?}");
    let meta = ops::inspect(&package, true).unwrap().meta.unwrap();
    assert_eq!(meta.generation, 2);
    assert!(qemu_pids("lib-run").is_empty());
}

#[test]
fn a_cancel_before_the_vm_is_live_stops_the_start() {
    let _lock = vm_lock();
    let state = tempfile::tempdir().unwrap();
    let paths = paths(state.path());
    let engine = QemuEngine::new("qemu-system-x86_64", &paths.cache).unwrap();
    let cancel = Cancel::new();
    cancel.cancel();
    let err = ops::boot(
        &engine,
        &paths,
        &BootOptions {
            source: BootSource::Blueprint(blueprint("tiny")),
            name: Some("lib-cancelled".into()),
            memory_mib: None,
            cpus: None,
            accel: AccelChoice::Auto,
            exit_when_live: false,
            live_timeout: None,
            console: None,
            started: Instant::now(),
            net: NetChoice::None,
        },
        &Collect::default(),
        &cancel,
    )
    .expect_err("a cancelled start fails");
    assert!(
        matches!(
            err,
            ferry_runtime::RuntimeError::Start(ferry_runtime::StartError::Vm(
                ferry_runtime::VmError::Interrupted
            ))
        ),
        "the start pipeline reports a cancel as its own error: {err:?}"
    );
    assert!(err.is_interrupted());
    assert_eq!(err.exit_class().code(), 130);
    assert!(qemu_pids("lib-cancelled").is_empty());
    assert!(!paths.vms().join("lib-cancelled").exists());
}
