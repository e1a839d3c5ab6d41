//! Every agent message against a real guest, and the engine's pause, save
//! and restore: a VM restored from its saved state carries on where it was.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ferry_agent_proto::{b64_decode, decode, encode, Frame, Identity, Reply, Request};
use ferry_blueprint::Blueprint;
use ferry_engine::{
    AccelChoice, DiskSpec, Engine, ExitReason, NetAttachment, ProbeGuest, Vm, VmSpec,
};
use ferry_qemu::QemuEngine;
use ferry_runtime::vm::{BootImage, RestoreMemory, RunningVm, VmConfig};
use ferry_runtime::vmdir::files;
use ferry_runtime::Paths;
use ferry_test_support::{blueprint, cache_dir, qemu_pids, vm_lock};

struct Setup {
    engine: QemuEngine,
    paths: Paths,
    blueprint: Blueprint,
    _state: tempfile::TempDir,
}

fn setup() -> Setup {
    let state = tempfile::tempdir().unwrap();
    let paths = Paths {
        state: state.path().to_path_buf(),
        cache: cache_dir(),
        net_prefix: "ferry".into(),
    };
    let engine = QemuEngine::new("qemu-system-x86_64", &paths.cache).unwrap();
    let blueprint = Blueprint::load(&blueprint("tiny")).unwrap();
    Setup {
        engine,
        paths,
        blueprint,
        _state: state,
    }
}

fn config(s: &Setup, name: &str) -> VmConfig {
    let accel = s
        .engine
        .choose_accel(
            AccelChoice::Auto,
            &ProbeGuest {
                kernel: s.blueprint.kernel(),
                initramfs: s.blueprint.initramfs(),
                cmdline: s.blueprint.manifest.cmdline.clone(),
            },
        )
        .unwrap()
        .accel;
    VmConfig {
        name: name.into(),
        memory_mib: 256,
        cpus: 1,
        accel,
        console: None,
        net: ferry_runtime::vm::NetChoice::None,
    }
}

fn exec(vm: &RunningVm, argv: &[&str]) -> (i32, String) {
    match vm
        .agent()
        .request(
            &Request::Exec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                stdin_b64: None,
                timeout_ms: Some(10_000),
            },
            Duration::from_secs(20),
        )
        .unwrap()
    {
        Reply::ExecResult {
            exit_code,
            stdout_b64,
            ..
        } => (
            exit_code,
            String::from_utf8(b64_decode(&stdout_b64).unwrap()).unwrap(),
        ),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// `reply` says the guest, whose clock was set to 2001, was brought up to
/// date: its clock stepped forward (and now reads this decade), its RNG
/// reseeded, and its hostname is `hostname`.
fn assert_caught_up(vm: &RunningVm, reply: Reply, hostname: &str) {
    match reply {
        Reply::Resumed {
            clock_step_ms,
            rng_reseeded,
            status,
        } => {
            assert!(
                clock_step_ms > 365 * 24 * 3600 * 1000,
                "the clock was stepped forward: {clock_step_ms}"
            );
            assert!(rng_reseeded);
            assert_eq!(status.hostname, hostname);
        }
        other => panic!("{other:?}"),
    }
    let (_, year) = exec(vm, &["date", "+%Y"]);
    assert!(
        year.trim().parse::<u32>().unwrap() >= 2026,
        "guest year {year}"
    );
}

fn uptime_s(vm: &RunningVm) -> f64 {
    let (_, out) = exec(vm, &["cat", "/proc/uptime"]);
    out.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn every_agent_message_against_a_real_guest() {
    let _lock = vm_lock();
    let s = setup();
    let mut vm = RunningVm::boot(
        &s.engine,
        &s.paths,
        &(&s.blueprint).into(),
        &config(&s, "t-agent"),
    )
    .unwrap();
    vm.wait_live(Duration::from_secs(120)).unwrap();
    let agent = vm.agent();

    // hello: version and status.
    let (version, status) = agent.hello(Duration::from_secs(5)).unwrap();
    assert_eq!(version, ferry_agent_proto::PROTOCOL_VERSION);
    assert!(status.live);
    assert_eq!(status.hostname, "ferry-tiny");

    // status.
    match agent
        .request(&Request::Status, Duration::from_secs(5))
        .unwrap()
    {
        Reply::Status(st) => assert!(st.live && st.uptime_ms > 0),
        other => panic!("{other:?}"),
    }

    // exec.
    assert_eq!(
        exec(&vm, &["sh", "-c", "echo hi; exit 4"]),
        (4, "hi\n".to_string())
    );

    // before-suspend: file systems synced (the agent answers once done).
    match agent
        .request(
            &Request::BeforeSuspend { drop_caches: true },
            Duration::from_secs(30),
        )
        .unwrap()
    {
        Reply::Quiesced { .. } => {}
        other => panic!("{other:?}"),
    }

    // after-resume: clock stepped, RNG reseeded, new identity taken.
    exec(&vm, &["date", "-s", "2001-01-01 00:00:00"]);
    let reply = vm
        .after_resume(Some(Identity {
            hostname: "clone-7".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        }))
        .unwrap();
    assert_caught_up(&vm, reply, "clone-7");
    assert_eq!(exec(&vm, &["hostname"]).1, "clone-7\n");
    assert_eq!(
        exec(&vm, &["cat", "/etc/machine-id"]).1.trim(),
        "0123456789abcdef0123456789abcdef"
    );

    // after-resume in the background (after a short pause): the same work,
    // at the guest's idle priority, answered all the same.
    exec(&vm, &["date", "-s", "2001-01-01 00:00:00"]);
    // The identity is kept.
    let answer = vm.after_short_pause().expect("a thread").join().unwrap();
    assert_caught_up(&vm, answer.unwrap(), "clone-7");

    // shutdown: the guest powers itself off.
    drop(agent);
    let reason = vm.shutdown().unwrap();
    assert_eq!(reason, ExitReason::Poweroff);
    assert!(qemu_pids("t-agent").is_empty());
}

#[test]
fn pause_save_and_restore_carry_on_where_the_guest_was() {
    let _lock = vm_lock();
    let s = setup();
    let saved = tempfile::tempdir().unwrap();
    let cfg = config(&s, "t-save");
    let mut vm = RunningVm::boot(&s.engine, &s.paths, &(&s.blueprint).into(), &cfg).unwrap();
    vm.wait_live(Duration::from_secs(120)).unwrap();
    assert_eq!(
        exec(
            &vm,
            &[
                "sh",
                "-c",
                "echo kept > /tmp/marker; echo disk > /root/on-disk; sync"
            ]
        )
        .0,
        0
    );
    let before = uptime_s(&vm);

    // Pause and resume.
    vm.engine_vm().pause().unwrap();
    vm.engine_vm().resume().unwrap();
    assert_eq!(exec(&vm, &["cat", "/tmp/marker"]).1, "kept\n");

    // Save: device state to a file; RAM is already in the memory file.
    vm.agent()
        .request(
            &Request::BeforeSuspend { drop_caches: false },
            Duration::from_secs(30),
        )
        .unwrap();
    let mut state = vm
        .engine_vm()
        .save_state(&saved.path().join("device-state"))
        .unwrap();
    let dir = vm.dir().path().to_path_buf();
    std::fs::copy(dir.join(files::MEMORY), saved.path().join("memory")).unwrap();
    std::fs::copy(dir.join(files::DISK), saved.path().join("disk.qcow2")).unwrap();
    state.memory_file = Some(saved.path().join("memory"));
    assert_eq!(state.provenance.engine, "qemu");
    drop(vm);
    assert!(qemu_pids("t-save").is_empty());

    // Restore into a new VM, private memory, the saved disk.
    let disk = saved.path().join("disk.qcow2");
    let vm = RunningVm::restore(
        &s.engine,
        &s.paths,
        &(&s.blueprint).into(),
        &cfg,
        &state,
        RestoreMemory::Private,
        |d| {
            std::fs::copy(&disk, d.path().join(files::DISK))
                .map(|_| ())
                .map_err(|e| ferry_runtime::FileError::at(&disk)(e).into())
        },
    )
    .unwrap();
    vm.after_resume(None).unwrap();
    assert_eq!(
        exec(&vm, &["cat", "/tmp/marker"]).1,
        "kept\n",
        "RAM (tmpfs) survived"
    );
    assert_eq!(
        exec(&vm, &["cat", "/root/on-disk"]).1,
        "disk\n",
        "the disk survived"
    );
    let after = uptime_s(&vm);
    assert!(after >= before, "no reboot: uptime {before} -> {after}");

    // A state saved with other settings is refused, naming the mismatch.
    let other = VmConfig {
        memory_mib: 512,
        name: "t-save-2".into(),
        ..cfg.clone()
    };
    let err = RunningVm::restore(
        &s.engine,
        &s.paths,
        &(&s.blueprint).into(),
        &other,
        &state,
        RestoreMemory::Private,
        |_| Ok(()),
    )
    .err()
    .expect("a memory mismatch is refused");
    assert!(
        err.to_string()
            .contains("256 MiB of memory (asked for 512)"),
        "{err}"
    );
    drop(vm);
}

/// The agent's channel, spoken to line by line: what a host that is newer
/// (or broken) than this agent may send.
struct RawAgent {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Bytes of a line not complete yet when a read timed out.
    partial: Vec<u8>,
}

impl RawAgent {
    fn new(stream: UnixStream) -> RawAgent {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        RawAgent {
            r: BufReader::new(stream.try_clone().unwrap()),
            w: stream,
            partial: Vec::new(),
        }
    }

    fn send_raw(&mut self, line: &[u8]) {
        self.w.write_all(line).unwrap();
    }

    /// The next frame, or `None` if none is complete within 200 ms.
    fn frame(&mut self) -> Option<Frame<Reply>> {
        match self.r.read_until(b'\n', &mut self.partial) {
            Ok(0) => panic!("the agent channel closed"),
            Ok(_) if self.partial.ends_with(b"\n") => {
                let line = std::mem::take(&mut self.partial);
                Some(
                    decode(&line[..line.len() - 1])
                        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&line))),
                )
            }
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading the agent channel: {e}"),
        }
    }

    /// The reply to request `id`, skipping events and other replies.
    fn reply(&mut self, id: u64, timeout: Duration) -> Reply {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(frame) = self.frame() {
                if frame.id == id {
                    return frame.body;
                }
            }
        }
        panic!("no reply to request {id} within {timeout:?}");
    }

    /// Says hello until the agent (still booting) answers.
    fn wait_hello(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut ids = Vec::new();
        while Instant::now() < deadline {
            let id = 1000 + ids.len() as u64;
            ids.push(id);
            self.send_raw(&encode(
                id,
                &Request::Hello {
                    host_version: "raw-test".into(),
                },
            ));
            if let Some(frame) = self.frame() {
                if ids.contains(&frame.id) {
                    assert!(matches!(frame.body, Reply::Hello { .. }), "{frame:?}");
                    return;
                }
            }
        }
        panic!("the agent did not answer hello within {timeout:?}");
    }
}

/// A clone's identity files are written after the after-resume answer, at
/// the guest's idle priority (so that they do not compete with the
/// service's first requests); an `exec` sent right after the answer still
/// sees them, because it waits for them. The test-only kernel word
/// `ferry.test.slow-identity` holds the writer back by 3 s.
#[test]
fn an_exec_right_after_resume_sees_the_clones_identity_files() {
    let _lock = vm_lock();
    let s = setup();
    let mut image: BootImage = (&s.blueprint).into();
    image.cmdline.push_str(" ferry.test.slow-identity");
    let mut vm = RunningVm::boot(&s.engine, &s.paths, &image, &config(&s, "t-identity")).unwrap();
    vm.wait_live(Duration::from_secs(120)).unwrap();
    let machine_id = "fedcba9876543210fedcba9876543210";
    let asked = Instant::now();
    let reply = vm
        .after_resume(Some(Identity {
            hostname: "clone-9".into(),
            machine_id: machine_id.into(),
        }))
        .unwrap();
    let answered = asked.elapsed();
    match reply {
        Reply::Resumed { status, .. } => assert_eq!(status.hostname, "clone-9"),
        other => panic!("{other:?}"),
    }
    assert!(
        answered < Duration::from_secs(2),
        "the answer waited for the identity files: {answered:?}"
    );
    assert_eq!(exec(&vm, &["cat", "/etc/machine-id"]).1.trim(), machine_id);
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "the exec did not wait for the writer held back by the test hook"
    );
    assert_eq!(exec(&vm, &["cat", "/etc/hostname"]).1, "clone-9\n");
}

/// A request type this agent does not know, as a newer host would send it:
/// the agent answers it with an error naming it, and carries on answering
/// what it knows on the same channel.
#[test]
fn an_unknown_request_type_gets_an_error_and_the_agent_carries_on() {
    let _lock = vm_lock();
    let s = setup();
    let cfg = config(&s, "t-raw-agent");
    let run_dir = tempfile::tempdir().unwrap();
    // The engine alone, so that this test owns the agent channel.
    let spec = VmSpec {
        name: cfg.name.clone(),
        kernel: s.blueprint.kernel(),
        initramfs: s.blueprint.initramfs(),
        cmdline: s.blueprint.manifest.cmdline.clone(),
        disk: DiskSpec::CopyOnWrite {
            base: s.blueprint.disk(),
            overlay: run_dir.path().join("disk.qcow2"),
        },
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        memory_file: run_dir.path().join("memory"),
        memory_shared: true,
        accel: cfg.accel,
        net: NetAttachment::Isolated,
        guest_mac: None,
        run_dir: run_dir.path().to_path_buf(),
        netboot: false,
    };
    let mut vm: Box<dyn Vm> = s.engine.boot(&spec).unwrap();
    let mut agent = RawAgent::new(vm.agent_stream().unwrap());
    agent.wait_hello(Duration::from_secs(120));

    agent.send_raw(b"{\"v\":1,\"id\":7001,\"body\":{\"type\":\"teleport\",\"to\":\"mars\"}}\n");
    match agent.reply(7001, Duration::from_secs(10)) {
        Reply::Error { message } => assert!(message.contains("teleport"), "{message}"),
        other => panic!("expected an error naming the request type, got {other:?}"),
    }

    // The same channel still works, for a request with output.
    agent.send_raw(&encode(
        7002,
        &Request::Exec {
            argv: vec!["echo".into(), "still here".into()],
            stdin_b64: None,
            timeout_ms: Some(10_000),
        },
    ));
    match agent.reply(7002, Duration::from_secs(20)) {
        Reply::ExecResult {
            exit_code,
            stdout_b64,
            ..
        } => {
            assert_eq!(exit_code, 0);
            assert_eq!(b64_decode(&stdout_b64).unwrap(), b"still here\n");
        }
        other => panic!("{other:?}"),
    }
    agent.send_raw(&encode(7003, &Request::Status));
    assert!(
        matches!(agent.reply(7003, Duration::from_secs(10)), Reply::Status(_)),
        "status after the unknown request"
    );

    drop(agent);
    vm.kill();
    assert!(qemu_pids("t-raw-agent").is_empty());
}
