//! A detached VM driven through the runtime's public API alone, as a
//! daemon (the control plane's worker) drives it: `fleet::run_detached`
//! starts a supervisor (this crate's `ferry` binary, the only CLI part),
//! then the control socket is used request by request, `fleet::list` reads
//! its state, a `stop` suspends it into the package and `fleet::start`
//! resumes it. The caller's `Paths` are not its own environment's (this
//! test sets no `FERRY_STATE`): the supervisor must use the ones it is
//! given.

mod common;

use std::time::Duration;

use ferry_engine::AccelChoice;
use ferry_runtime::control::{call, ControlReply, ControlRequest};
use ferry_runtime::events::{Collect, Event};
use ferry_runtime::fleet::{self, RunDetachedOptions};
use ferry_runtime::record::{NetSpec, RecordState};
use ferry_runtime::vmdir::files;
use ferry_runtime::{ops, Cancel, Paths};
use ferry_test_support::{
    cache_dir, qemu_pids, raw_control_request, vm_lock, wait_until, FerryEnv,
};

/// Stops what the test started, whatever happens.
struct Cleanup<'a>(&'a FerryEnv);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", "--all", "--discard"]);
    }
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

/// Whether process `pid` still runs. The supervisors this test started
/// are its children (as a worker's are the worker's, which reaps them the
/// same way): an exited one is reaped here, or it would stay a zombie.
fn pid_alive(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on one pid only reads its status into
    // a local; for a pid that is not our child it fails with ECHILD.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    reaped != pid as libc::pid_t && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_detached_owner_through_the_library_alone() {
    assert!(
        std::env::var_os("FERRY_STATE").is_none(),
        "this test checks that the supervisor uses the caller's paths, not FERRY_STATE"
    );
    let _lock = vm_lock();
    let env = common::env();
    let _cleanup = Cleanup(&env);
    let package = common::copy_of_package(&env, "lib-det.ferry");
    let paths = Paths {
        state: env.state.path().to_path_buf(),
        cache: cache_dir(),
        net_prefix: "ferry".into(),
    };
    let ferry = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ferry"));

    let events = Collect::default();
    let started = fleet::run_detached(
        &paths,
        &RunDetachedOptions {
            package: package.clone(),
            name: "lib-det".into(),
            clone: false,
            accel: AccelChoice::Auto,
            net: NetSpec::default(),
            live_timeout: Duration::from_secs(120),
            ferry: ferry.clone(),
            trust: Default::default(),
        },
        &events,
        &Cancel::new(),
    )
    .expect("run_detached");
    assert_eq!(started.name, "lib-det");
    assert_ne!(started.pid, std::process::id(), "a supervisor of its own");
    assert!(pid_alive(started.pid));
    assert!(
        events
            .events()
            .iter()
            .any(|e| matches!(e, Event::Started(s) if s.pid == started.pid)),
        "{:?}",
        events.events()
    );

    // The control API, request by request, served by the supervisor.
    let socket = paths.vms().join("lib-det").join(files::CONTROL);
    assert!(
        socket.exists(),
        "the control socket is under the given state"
    );
    match call(&socket, &ControlRequest::Status, Duration::from_secs(10)).unwrap() {
        ControlReply::Status(s) => {
            assert_eq!(s.name, "lib-det");
            assert_eq!(s.state, "running");
            assert!(s.live);
            assert_eq!(s.pid, started.pid);
            assert_eq!(s.engine_pid, started.engine_pid);
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
    match call(
        &socket,
        &ControlRequest::Exec {
            argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
            stdin_b64: None,
            timeout_ms: Some(20_000),
        },
        Duration::from_secs(30),
    )
    .unwrap()
    {
        ControlReply::Exec(out) => assert_eq!(out.exit_code, 7),
        other => panic!("exec: {other:?}"),
    }
    exec(&paths, "lib-det", "echo kept > /tmp/marker");

    // Its state, as `ferry ps` reads it.
    let info = fleet::list(&paths)
        .into_iter()
        .find(|v| v.name == "lib-det")
        .expect("listed");
    assert_eq!(info.state, RecordState::Running);
    assert!(info.detached);
    assert_eq!(info.pid, Some(started.pid));

    // stop: suspended into the package; the supervisor and QEMU end.
    let reply = call(
        &socket,
        &ControlRequest::Stop { discard: false },
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(
        matches!(&reply, ControlReply::Stopped { state, .. } if state == "suspended"),
        "{reply:?}"
    );
    wait_until(Duration::from_secs(30), "the supervisor to exit", || {
        (!pid_alive(started.pid) && qemu_pids("lib-det").is_empty()).then_some(())
    });
    let meta = ops::inspect(&package, true).unwrap().meta.unwrap();
    assert_eq!(meta.generation, 1);
    let info = fleet::list(&paths)
        .into_iter()
        .find(|v| v.name == "lib-det")
        .expect("still listed");
    assert_eq!(info.state, RecordState::Suspended);

    // start: resumed with its RAM; then stopped for good.
    let resumed = fleet::start(
        &paths,
        &ferry,
        "lib-det",
        Duration::from_secs(120),
        &Cancel::new(),
    )
    .expect("start")
    .expect("it was not running");
    assert_ne!(resumed.pid, started.pid);
    assert_eq!(exec(&paths, "lib-det", "cat /tmp/marker"), "kept");
    let reply = call(
        &socket,
        &ControlRequest::Stop { discard: true },
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        matches!(&reply, ControlReply::Stopped { state, .. } if state == "discarded"),
        "{reply:?}"
    );
    wait_until(Duration::from_secs(30), "the resumed VM to end", || {
        (!pid_alive(resumed.pid) && qemu_pids("lib-det").is_empty()).then_some(())
    });
}
