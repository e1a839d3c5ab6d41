//! The engine's edges with real QEMU: a guest that stops at once (whatever
//! ferry asks afterwards is answered with QEMU's own exit reason, never
//! with a missing socket), a start whose last-moment callback fails, and
//! the end of a received disk's export while its sender is still
//! connected.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ferry_blueprint::Blueprint;
use ferry_engine::{Accel, DiskSpec, Engine, ExitReason, NetAttachment, VmSpec};
use ferry_qemu::QemuEngine;
use ferry_test_support::{blueprint, cache_dir, qemu_pids, vm_lock};

/// Reads `stream` until the other end closes (or resets) it.
fn read_to_close(mut stream: UnixStream, within: Duration) {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the agent channel stayed open: {e}"),
        }
    }
}

/// The tiny blueprint as VM `name`, TCG, 256 MiB, no network, with
/// `extra_cmdline` after the blueprint's command line; files in `run_dir`.
fn tiny_spec(name: &str, extra_cmdline: &str, run_dir: &std::path::Path) -> VmSpec {
    let bp = Blueprint::load(&blueprint("tiny")).unwrap();
    VmSpec {
        name: name.into(),
        kernel: bp.kernel(),
        initramfs: bp.initramfs(),
        cmdline: format!("{}{extra_cmdline}", bp.manifest.cmdline),
        disk: DiskSpec::CopyOnWrite {
            base: bp.disk(),
            overlay: run_dir.join("disk.qcow2"),
        },
        memory_mib: 256,
        cpus: 1,
        memory_file: run_dir.join("memory"),
        memory_shared: true,
        accel: Accel::Tcg,
        net: NetAttachment::Isolated,
        guest_mac: None,
        run_dir: run_dir.to_path_buf(),
        netboot: false,
    }
}

/// The tiny guest with `ferry.probe` on its command line prints a marker and
/// powers off at once; QEMU (`-no-reboot`) exits, closing the agent channel
/// and removing the agent socket a moment before the process is gone. Asking
/// for the agent channel again right then, as a supervisor that sees the
/// channel close does, must say that QEMU exited and why.
#[test]
fn the_agent_channel_of_a_guest_that_powered_off_names_the_exit() {
    let _lock = vm_lock();
    let engine = QemuEngine::new("qemu-system-x86_64", &cache_dir()).unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let spec = tiny_spec("t-gone", " ferry.probe", run_dir.path());
    let mut vm = engine.boot(&spec).unwrap();
    read_to_close(vm.agent_stream().unwrap(), Duration::from_secs(120));
    // The channel closed: connect again at once. A connection made before
    // QEMU removed its socket closes as well; the next attempt meets the
    // exit.
    let mut attempts = 0;
    let err = loop {
        attempts += 1;
        assert!(
            attempts < 20,
            "connected {attempts} times to an exiting QEMU"
        );
        match vm.agent_stream() {
            Ok(stream) => read_to_close(stream, Duration::from_secs(10)),
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains("QEMU exited: the guest powered off") && !err.contains("agent socket"),
        "{err}"
    );
    assert_eq!(
        vm.wait_exit(Duration::from_secs(5)),
        Some(ExitReason::Poweroff)
    );
    assert!(qemu_pids("t-gone").is_empty());
}

/// `boot_gated`'s callback runs while QEMU is up (paused) and before the
/// guest runs; when it fails, the boot fails with its error and no QEMU is
/// left behind. The runtime makes the VM's firewall in that window.
#[test]
fn a_failing_gate_stops_the_boot_and_leaves_no_qemu() {
    let _lock = vm_lock();
    let engine = QemuEngine::new("qemu-system-x86_64", &cache_dir()).unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let spec = tiny_spec("t-gate", "", run_dir.path());
    let mut calls = 0;
    let mut seen_running = Vec::new();
    let err = engine
        .boot_gated(&spec, &mut || {
            calls += 1;
            seen_running = qemu_pids("t-gate");
            Err(ferry_engine::EngineError::StartFailed(
                "the gate says no".into(),
            ))
        })
        .err()
        .expect("the boot goes on after its gate failed");
    assert_eq!(calls, 1);
    assert!(
        !seen_running.is_empty(),
        "QEMU was not running when the gate was called"
    );
    assert!(err.to_string().contains("the gate says no"), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !qemu_pids("t-gate").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU outlived its failed boot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The end of a move: the sender says "switch" once its copy is finished
/// (every write acknowledged), and closes its NBD connection to the
/// received disk only after that (the close took QEMU about 55 ms, with the
/// guest paused). Ending the export while that idle connection is still
/// open must neither wait for it nor fail ("export … still in use", as it
/// once did), and what the sender wrote stays on the disk.
#[test]
fn ending_a_received_disk_cuts_the_idle_sender_and_keeps_its_writes() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let _lock = vm_lock();
    let engine = QemuEngine::new("qemu-system-x86_64", &cache_dir()).unwrap();
    // A provenance this engine accepts: a tiny guest's own, saved.
    let first = tempfile::tempdir().unwrap();
    let mut vm = engine
        .boot(&tiny_spec("t-export-src", "", first.path()))
        .unwrap();
    let saved = vm.save_state(&first.path().join("state")).unwrap();
    drop(vm);

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("received.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let spec = VmSpec {
        disk: DiskSpec::Raw(disk.clone()),
        ..tiny_spec("t-export", "", dir.path())
    };
    let socket = dir.path().join("in-disk.sock");
    let incoming = ferry_engine::Incoming {
        disk_socket: Some(socket.clone()),
    };
    let mut vm = engine.receive(&spec, &saved.provenance, &incoming).unwrap();
    // A client of the export, as the sender's mirror is: it writes, then
    // holds its connection, idle, until its input closes.
    let mut client = Command::new("qemu-io")
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,path={},export={}",
            socket.display(),
            ferry_engine::DISK_EXPORT_NAME
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = client.stdin.take().unwrap();
    writeln!(input, "write -P 0xab 0 64k").unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("wrote 65536/65536") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "qemu-io could not write to the export"
        );
    }
    let t = std::time::Instant::now();
    vm.end_disk_export().unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "ending the export waited for its idle client ({took:?})"
    );
    // No new client gets in: the export is gone (the server itself stops
    // once the guest runs).
    let late = Command::new("qemu-io")
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,path={},export={}",
            socket.display(),
            ferry_engine::DISK_EXPORT_NAME
        ))
        .args(["-c", "read 0 512"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&late.stdout).contains("read 512/512"),
        "a client could still read the export after it ended"
    );
    drop(input);
    let _ = client.kill();
    let _ = client.wait();
    drop(vm);
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        bytes[..64 << 10].iter().all(|&b| b == 0xab),
        "the sender's write is not on the received disk"
    );
}
