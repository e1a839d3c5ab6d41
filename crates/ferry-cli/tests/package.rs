//! `ferry package`, `ferry run`, `ferry inspect` with real QEMU: snapshot a
//! live guest, resume it without a reboot, suspend it back, and refuse bad
//! packages without ever changing them.

use std::time::Duration;

use ferry_package::{Package, SectionKind};
use ferry_test_support::{describe, qemu_pids, send_signal, spawn_until_live, vm_lock, wait_until};

mod common;
use common::{
    copy_of_package, env, error_line, exec, rewrite, run_fails, stop, tiny_package, uptime,
};

#[test]
fn package_run_suspend_and_run_again_keeps_everything() {
    let _lock = vm_lock();
    let env = env();
    let pkg = copy_of_package(&env, "p.ferry");

    let out = env.run(&["inspect", pkg.to_str().unwrap(), "--verify"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for section in [
        "config",
        "device-state",
        "memory",
        "kernel",
        "initramfs",
        "disk",
        "verify:    ok",
    ] {
        assert!(text.contains(section), "inspect shows {section}: {text}");
    }

    let args = ["run", "--package", pkg.to_str().unwrap(), "--name", "p1"];
    let (mut run, lines) = spawn_until_live(&env, &args, Duration::from_secs(120));
    assert!(
        lines.iter().any(|l| l.starts_with("resumed in ")),
        "{lines:?}"
    );
    // The service answers at once: it was live when packaged.
    assert_eq!(
        exec(&env, "p1", "wget -qO- http://127.0.0.1:8080/"),
        "hello from a ferry tiny guest"
    );
    let up1 = uptime(&env, "p1");
    exec(
        &env,
        "p1",
        "echo in-ram > /tmp/ram-note; echo on-disk > /root/disk-note; sync",
    );

    // One run per package; a clone is fine and gets its own identity.
    let out = env.run(&[
        "run",
        "--package",
        pkg.to_str().unwrap(),
        "--name",
        "p-second",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("in use by another 'ferry run'"),
        "{}",
        describe(&out)
    );
    let before_clone = std::fs::read(&pkg).unwrap();
    let (mut clone, _) = spawn_until_live(
        &env,
        &[
            "run",
            "--package",
            pkg.to_str().unwrap(),
            "--clone",
            "--name",
            "c1",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(exec(&env, "c1", "hostname"), "c1");
    assert_ne!(
        exec(&env, "c1", "cat /etc/machine-id"),
        exec(&env, "p1", "cat /etc/machine-id")
    );
    assert!(exec(&env, "c1", "cat /tmp/ram-note 2>/dev/null || echo absent") == "absent");
    let out = stop(&mut clone);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        std::fs::read(&pkg).unwrap() == before_clone,
        "a clone never changes the package"
    );
    assert!(qemu_pids("c1").is_empty());

    // Ctrl-C suspends into the package.
    let out = stop(&mut run);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("suspending into"),
        "{}",
        describe(&out)
    );
    assert!(qemu_pids("p1").is_empty());
    let out = env.run(&["inspect", pkg.to_str().unwrap(), "--verify"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("generation 1"),
        "{}",
        describe(&out)
    );

    // Run again: memory and disk are where they were, and no reboot.
    let (mut run, _) = spawn_until_live(&env, &args, Duration::from_secs(120));
    assert_eq!(exec(&env, "p1", "cat /tmp/ram-note"), "in-ram");
    assert_eq!(exec(&env, "p1", "cat /root/disk-note"), "on-disk");
    let up2 = uptime(&env, "p1");
    assert!(up2 >= up1, "uptime continues: {up1} -> {up2}");
    let out = stop(&mut run);
    assert!(out.status.success(), "{}", describe(&out));
}

/// A package is checked in full beside its first resume; an unchanged
/// package is not hashed again beside the next (issue 12); one damaged in
/// place since is checked again and refused.
#[test]
fn an_unchanged_package_is_checked_once_and_a_changed_one_again() {
    let _lock = vm_lock();
    let env = env();
    let pkg = copy_of_package(&env, "checked.ferry");
    let run = |name: &str| {
        let mut cmd = env.cmd();
        cmd.args(["run", "--json", "--clone", "--name", name, "--package"])
            .arg(&pkg);
        let (mut child, lines) = ferry_test_support::spawn_until(
            cmd,
            r#"{"v":1,"type":"live""#,
            Duration::from_secs(120),
        );
        let out = stop(&mut child);
        assert!(out.status.success(), "{}", describe(&out));
        lines
            .iter()
            .any(|l| l.contains(r#""phase":"package-verified""#))
    };
    assert!(run("c1"), "the first run checks every chunk");
    assert!(
        !run("c2"),
        "the second run of the unchanged package does not"
    );

    // One byte of the kernel section flipped in place, same size.
    let chunk = Package::open(&pkg)
        .unwrap()
        .section(SectionKind::Kernel)
        .unwrap()
        .chunks
        .iter()
        .flatten()
        .next()
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&pkg).unwrap();
    bytes[(chunk.offset + chunk.stored_len / 2) as usize] ^= 0x55;
    std::fs::write(&pkg, &bytes).unwrap();
    let out = run_fails(&env, &pkg);
    assert!(error_line(&out).contains("corrupt"), "{}", describe(&out));
}

#[test]
fn bad_packages_are_refused_and_left_unchanged() {
    let _lock = vm_lock();
    let env = env();
    let good = tiny_package(&env);
    let len = std::fs::metadata(&good).unwrap().len();

    // Truncated.
    let p = env.state.path().join("truncated.ferry");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&p, &bytes[..(len as usize) / 2]).unwrap();
    let out = run_fails(&env, &p);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).to_lowercase().contains("truncated")
            || error_line(&out).contains("corrupt"),
        "{}",
        describe(&out)
    );

    // A flipped byte inside a chunk: inspect --verify finds it, run refuses.
    let p = env.state.path().join("flipped.ferry");
    let pkg = Package::open(&good).unwrap();
    let chunk = pkg
        .section(SectionKind::Kernel)
        .unwrap()
        .chunks
        .iter()
        .flatten()
        .next()
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[(chunk.offset + chunk.stored_len / 2) as usize] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    let out = env.run(&["inspect", "--verify", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("kernel"), "{}", describe(&out));
    let out = run_fails(&env, &p);
    assert!(error_line(&out).contains("corrupt"), "{}", describe(&out));

    // Not a package at all.
    let p = env.state.path().join("junk.ferry");
    std::fs::write(&p, b"this is not a package").unwrap();
    let out = run_fails(&env, &p);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));

    // Another engine version.
    let p = env.state.path().join("other-engine.ferry");
    rewrite(
        &good,
        &p,
        |m| m.provenance.engine_version = "0.9.0".into(),
        None,
    );
    let out = run_fails(&env, &p);
    assert!(
        error_line(&out).contains("QEMU 0.9.0"),
        "{}",
        describe(&out)
    );

    // Another CPU model.
    let p = env.state.path().join("other-cpu.ferry");
    rewrite(
        &good,
        &p,
        |m| m.provenance.cpu_model = "some-other-cpu".into(),
        None,
    );
    let out = run_fails(&env, &p);
    assert!(
        error_line(&out).contains("CPU model 'some-other-cpu'"),
        "{}",
        describe(&out)
    );

    // More memory than the host has.
    let p = env.state.path().join("huge.ferry");
    rewrite(&good, &p, |m| m.provenance.memory_mib = 64u64 << 20, None);
    let out = run_fails(&env, &p);
    assert!(
        error_line(&out).contains("MiB of guest memory but this host has"),
        "{}",
        describe(&out)
    );

    // A missing section.
    let p = env.state.path().join("no-disk.ferry");
    rewrite(&good, &p, |_| {}, Some(SectionKind::Disk));
    let out = run_fails(&env, &p);
    assert!(error_line(&out).contains("disk"), "{}", describe(&out));
}

/// Ctrl-C with the package on a read-only mount, or on a full disk: a clear
/// error, the package unchanged, and the VM still running.
#[test]
fn write_back_failures_keep_the_package_and_the_vm() {
    let _lock = vm_lock();
    let env = env();
    let good = tiny_package(&env);
    let size_mib = std::fs::metadata(&good).unwrap().len().div_ceil(1 << 20);
    let mut killed = Vec::new();

    for case in ["read-only", "full"] {
        let mnt = env.state.path().join(format!("mnt-{case}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let sh = |cmd: &str| {
            let ok = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{cmd}");
        };
        let m = mnt.display();
        if case == "read-only" {
            let src = env.state.path().join("rw");
            std::fs::create_dir_all(&src).unwrap();
            std::fs::copy(&good, src.join("p.ferry")).unwrap();
            sh(&format!(
                "mount --bind {} {m} && mount -o remount,ro,bind {m}",
                src.display()
            ));
        } else {
            sh(&format!(
                "mount -t tmpfs -o size={}m tmpfs {m}",
                size_mib + 1
            ));
            std::fs::copy(&good, mnt.join("p.ferry")).unwrap();
        }
        let pkg = mnt.join("p.ferry");
        let before = std::fs::read(&pkg).unwrap();
        let (mut run, _) = spawn_until_live(
            &env,
            &["run", "--package", pkg.to_str().unwrap(), "--name", "t-wb"],
            Duration::from_secs(120),
        );
        send_signal(run.id(), libc::SIGINT);
        // The VM keeps serving after the failed write-back.
        wait_until(
            Duration::from_secs(60),
            "the VM to answer after the failed write-back",
            || {
                std::thread::sleep(Duration::from_millis(500));
                let out = env.run(&["exec", "t-wb", "--", "cat", "/srv/www/index.html"]);
                out.status.success().then_some(())
            },
        );
        assert!(run.try_wait().unwrap().is_none(), "ferry run keeps running");
        send_signal(run.id(), libc::SIGKILL);
        killed.push(run.id());
        let _ = run.wait();
        let out = {
            use std::io::Read;
            let mut err = String::new();
            run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            err
        };
        assert!(
            out.contains("could not suspend into") && out.contains("the package is unchanged"),
            "{case}: {out}"
        );
        wait_until(Duration::from_secs(10), "QEMU to go", || {
            qemu_pids("t-wb").is_empty().then_some(())
        });
        assert!(
            std::fs::read(&pkg).unwrap() == before,
            "{case}: the package is byte-for-byte unchanged"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        sh(&format!("umount {m}"));
        assert_eq!(
            leftovers.len(),
            1,
            "{case}: no temp files left: {leftovers:?}"
        );
        // The killed supervisor left its state dir and namespace; the next
        // start under its name takes both over.
    }
    // The last killed supervisor's leftovers go with the next start too.
    let bp = ferry_test_support::blueprint("tiny");
    let out = env.run(&[
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--name",
        "t-wb",
        "--exit-when-live",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!env.vm_dir("t-wb").exists());
    assert!(
        !std::path::Path::new("/run/netns/ferry-t-wb").exists(),
        "the dead VM's namespace is gone"
    );
    // And the killed supervisors' cgroups (`ferry-t-wb-<pid>-<n>`), which
    // nothing else removes.
    let cgroups = ferry_test_support::own_memory_cgroup();
    let left: Vec<String> = std::fs::read_dir(&cgroups)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            killed
                .iter()
                .any(|pid| n.starts_with(&format!("ferry-t-wb-{pid}-")))
        })
        .collect();
    assert!(
        left.is_empty(),
        "the killed supervisors' cgroups in {}: {left:?}",
        cgroups.display()
    );
}

/// `--enable-input`: what is typed reaches the shell on the guest's console.
#[test]
fn enable_input_reaches_the_guest_console() {
    let _lock = vm_lock();
    let env = env();
    let pkg = tiny_package(&env);
    let (mut run, _) = spawn_until_live(
        &env,
        &[
            "run",
            "--package",
            pkg.to_str().unwrap(),
            "--clone",
            "--enable-input",
            "--name",
            "t-input",
        ],
        Duration::from_secs(120),
    );
    use std::io::Write;
    let mut stdin = run.stdin.take().unwrap();
    stdin
        .write_all(b"echo typed-$((40+2)) on $(hostname)\n")
        .unwrap();
    stdin.flush().unwrap();
    let log = env.vm_dir("t-input").join("console.log");
    wait_until(
        Duration::from_secs(30),
        "the typed command's output on the console",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("typed-42 on t-input").then_some(())
        },
    );
    let out = stop(&mut run);
    assert!(out.status.success(), "{}", describe(&out));
}
