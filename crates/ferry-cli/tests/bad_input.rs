//! Every bad input gets a one-line error that names the cause and the fix,
//! a non-zero exit code, and leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_test_support::{
    blueprint, describe, fixtures_dir, qemu_pids, vm_lock, workspace_root, FerryEnv,
};

fn env() -> FerryEnv {
    FerryEnv::new(env!("CARGO_BIN_EXE_ferry"))
}

/// The one error line ferry printed.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ferry: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line expected: {}",
        describe(out)
    );
    lines[0].to_string()
}

/// Builds a blueprint from a variant of the tiny recipe named `name`.
fn tiny_variant(env: &FerryEnv, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("recipes/tiny.toml"))
        .unwrap()
        .replace("name = \"tiny\"", &format!("name = \"{name}\""));
    let recipe = fixtures_dir().join(format!("{name}.toml"));
    std::fs::write(&recipe, edit(text)).unwrap();
    let bp = env.state.path().join(name);
    let out = env.run(&[
        "blueprint",
        "build",
        "--quiet",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        bp.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    bp
}

/// Boots `bp` as VM `name` (with `extra` flags), expects it to fail as a VM
/// failure (exit 5) leaving nothing behind, and returns the error line.
fn failed_boot(env: &FerryEnv, bp: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--name",
        name,
        "--exit-when-live",
    ];
    args.extend_from_slice(extra);
    let out = env.run(&args);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert_cleaned_up(env, name);
    error_line(&out)
}

/// The failed VM left neither its state dir nor its QEMU behind.
fn assert_cleaned_up(env: &FerryEnv, vm: &str) {
    assert!(!env.vm_dir(vm).exists(), "state dir of {vm} is removed");
    assert!(qemu_pids(vm).is_empty(), "no QEMU of {vm} is left");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn unknown_recipe() {
    let env = env();
    let out_dir = env.state.path().join("bp");
    let out = env.run(&[
        "blueprint",
        "build",
        "--recipe",
        "nginx",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains("unknown recipe 'nginx'") && line.contains("tiny, redis"),
        "{line}"
    );
    assert!(!out_dir.exists());
}

#[test]
fn a_missing_or_dynamic_recipe_binary_names_the_fix() {
    let env = env();
    let out_dir = env.state.path().join("bp");
    let build = |binary: &str| {
        env.run(&[
            "blueprint",
            "build",
            "--recipe",
            "web",
            "--out",
            out_dir.to_str().unwrap(),
            "--binary",
            &format!("ferry-web={binary}"),
        ])
    };
    let out = build("/nonexistent/ferry-web");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains("recipe binary 'ferry-web' (for /usr/local/bin/ferry-web)")
            && line.contains("/nonexistent/ferry-web (from --binary ferry-web)")
            && line.contains("scripts/build.sh")
            && line.contains("FERRY_BIN_FERRY_WEB"),
        "{line}"
    );
    // ferry itself is dynamically linked: no use in a guest.
    let out = build(env!("CARGO_BIN_EXE_ferry"));
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("is dynamically linked"),
        "{}",
        describe(&out)
    );
    let out = env.run(&[
        "blueprint",
        "build",
        "--recipe",
        "web",
        "--out",
        "x",
        "--binary",
        "ferry-web",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(!out_dir.exists());
}

#[test]
fn existing_output_is_not_overwritten_without_force() {
    let env = env();
    let out_dir = env.state.path().join("bp");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("keep"), "x").unwrap();
    let out = env.run(&[
        "blueprint",
        "build",
        "--recipe",
        "tiny",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("--force"));
    assert!(out_dir.join("keep").exists());
}

#[test]
fn no_space_for_the_disk_image() {
    let env = env();
    let mnt = env.state.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small tmpfs needs root");
    let out_dir = mnt.join("bp");
    let out = env.run(&[
        "blueprint",
        "build",
        "--recipe",
        "tiny",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let listing: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains("not enough free space") && line.contains("choose another --out"),
        "{line}"
    );
    assert!(
        listing.is_empty(),
        "nothing half-written is left: {listing:?}"
    );
}

#[test]
fn missing_or_corrupt_blueprint_files() {
    let env = env();
    let good = blueprint("tiny");
    let bad = env.state.path().join("bad-bp");
    copy_dir(&good, &bad);

    // A flipped byte in the initramfs.
    let initramfs = bad.join("initramfs");
    let mut bytes = std::fs::read(&initramfs).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&initramfs, bytes).unwrap();
    let out = env.run(&[
        "boot",
        "--blueprint",
        bad.to_str().unwrap(),
        "--exit-when-live",
        "--name",
        "t-corrupt",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains("initramfs is corrupt") && line.contains("ferry blueprint build"),
        "{line}"
    );

    // A missing kernel.
    std::fs::remove_file(bad.join("kernel")).unwrap();
    let out = env.run(&[
        "boot",
        "--blueprint",
        bad.to_str().unwrap(),
        "--exit-when-live",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("kernel is missing"));

    // Not a blueprint at all.
    let out = env.run(&["boot", "--blueprint", "/nonexistent", "--exit-when-live"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("blueprint.toml is missing"));
    assert!(qemu_pids("t-corrupt").is_empty());
}

#[test]
fn qemu_not_installed() {
    let env = env();
    let bp = blueprint("tiny");
    let out = env
        .cmd()
        .env("FERRY_QEMU", "/nonexistent/qemu-system-x86_64")
        .args([
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--exit-when-live",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(error_line(&out).contains("apt-get install -y --no-install-recommends qemu-system-x86"));
}

#[test]
fn memory_too_small_and_bad_names() {
    let env = env();
    let bp = blueprint("tiny");
    let out = env.run(&[
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--memory-size",
        "64",
        "--exit-when-live",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out)
        .contains("--memory-size 64 is too small for recipe 'tiny': it needs at least 128 MiB"));

    let out = env.run(&[
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--name",
        "Bad/Name",
        "--exit-when-live",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("invalid VM name"));

    let out = env.run(&[
        "boot",
        "--blueprint",
        bp.to_str().unwrap(),
        "--memry-size",
        "64",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a misspelt flag is a usage error: {}",
        describe(&out)
    );
}

/// A recipe whose service never listens: the agent answers but the VM is
/// never live. ferry gives up at the timeout and cleans up.
#[test]
fn service_never_live() {
    let _lock = vm_lock();
    let env = env();
    let bp = tiny_variant(&env, "never-live", |t| t.replace("port = 8080", "port = 9"));

    let line = failed_boot(&env, &bp, "t-never", &["--live-timeout", "25"]);
    assert!(
        line.contains("did not become live within 25 s") && line.contains("--live-timeout"),
        "{line}"
    );
}

/// Too short a timeout for the agent to even start: reported as a silent
/// agent, with the fix.
#[test]
fn agent_silent() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    let line = failed_boot(&env, &bp, "t-silent", &["--live-timeout", "1"]);
    assert!(
        line.contains("guest agent did not answer within 1 s") && line.contains("--live-timeout"),
        "{line}"
    );
}

/// A guest whose init cannot start stops; ferry says so with the guest's
/// last words.
#[test]
fn guest_crash_is_reported() {
    let _lock = vm_lock();
    let env = env();
    let bp = tiny_variant(&env, "broken", |t| {
        t.replace(
            "[files]",
            "[files]\n\"/ferry/init\" = \"#!/ferry/bin/busybox sh\\necho ferry-test: init is broken\\nexit 1\\n\"",
        )
    });
    let line = failed_boot(&env, &bp, "t-broken", &[]);
    // The recipe's file replaces /ferry/init without its execute bit, so the
    // initramfs refuses to switch to it and powers the guest off.
    assert!(
        line.contains("stopped unexpectedly") && line.contains("ferry-init: /ferry/init"),
        "{line}"
    );
}
