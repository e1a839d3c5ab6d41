//! Helpers shared by the tests that run packages.
#![allow(dead_code)]

pub mod hosts;
pub mod kv;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;

use ferry_package::{Package, PackageWriter, SecretKey, SectionKind, VmMeta, DEFAULT_CHUNK_SIZE};
use ferry_test_support::{
    blueprint, describe, fixtures_dir, qemu_pids, send_signal, wait_until, FerryEnv, KillOnDrop,
};

/// A field of `/proc/PID/status`, trimmed.
pub fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

pub fn env() -> FerryEnv {
    FerryEnv::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A package of the tiny blueprint, made once per checkout.
pub fn tiny_package(env: &FerryEnv) -> PathBuf {
    recipe_package(env, "tiny")
}

/// A package of `recipe`'s test blueprint, made once per checkout (again
/// when the blueprint changes).
pub fn recipe_package(env: &FerryEnv, recipe: &str) -> PathBuf {
    let path = fixtures_dir().join(format!("{recipe}.ferry"));
    let bp = blueprint(recipe);
    let stamp = fixtures_dir().join(format!("{recipe}.ferry.from"));
    // A package from another QEMU may not load here: the engine is part
    // of the stamp.
    let qemu = std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let qemu_version = std::process::Command::new(&qemu)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let want = format!(
        "{:?} {qemu_version}",
        std::fs::metadata(bp.join("blueprint.toml"))
            .and_then(|m| m.modified())
            .ok()
    );
    if !path.exists() || std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let out = env.run(&[
            "package",
            "--blueprint",
            bp.to_str().unwrap(),
            "--out",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("packaged "), "{stdout}");
        std::fs::write(&stamp, want).unwrap();
    }
    path
}

/// A private copy of the tiny package for a test that changes it.
pub fn copy_of_package(env: &FerryEnv, name: &str) -> PathBuf {
    let src = tiny_package(env);
    let dst = env.state.path().join(name);
    std::fs::copy(&src, &dst).unwrap();
    dst
}

pub fn exec(env: &FerryEnv, vm: &str, script: &str) -> String {
    let out = env.run(&["exec", vm, "--", "sh", "-c", script]);
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn uptime(env: &FerryEnv, vm: &str) -> f64 {
    exec(env, vm, "cut -d' ' -f1 /proc/uptime").parse().unwrap()
}

/// Ctrl-C, then what ferry said. One that has not exited after 60 s is
/// killed, and the test fails with what it said until then: a hung save
/// shows its last words, not only that it hung.
pub fn stop(child: &mut Child) -> Output {
    send_signal(child.id(), libc::SIGINT);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = collect(child);
            panic!(
                "timed out after 60s waiting for ferry to exit after Ctrl-C; killed it\n{}",
                describe(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    collect(child)
}

/// The exited (or killed) `child`'s status and output.
fn collect(child: &mut Child) -> Output {
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut stderr);
    }
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    }
}

pub fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .rfind(|l| l.starts_with("ferry: "))
        .unwrap_or_else(|| panic!("no error line: {}", describe(out)))
        .to_string()
}

/// Rewrites a package through the library: `edit` changes its metadata,
/// `skip` leaves a section out.
pub fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut VmMeta), skip: Option<SectionKind>) {
    rewrite_with(src, dst, edit, skip, None)
}

/// [`rewrite`], signing the new package with `sign` if given.
pub fn rewrite_with(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut VmMeta),
    skip: Option<SectionKind>,
    sign: Option<&SecretKey>,
) {
    let pkg = Package::open(src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut w = PackageWriter::create(dst).unwrap();
    for s in pkg.sections() {
        if Some(s.kind) == skip {
            continue;
        }
        let f = tmp.path().join(s.kind.to_string());
        pkg.extract(s.kind, &f, &mut |_, _| {}).unwrap();
        w.add_file(s.kind, &f, DEFAULT_CHUNK_SIZE, None, &mut |_, _| {})
            .unwrap();
    }
    let mut meta = pkg.vm_meta().unwrap();
    edit(&mut meta);
    if let Some(k) = sign {
        w.sign_with(k.clone());
    }
    w.commit(&meta).unwrap();
}

/// `ferry run --package PKG --name t-bad`, which must fail: no VM is left
/// and the package is byte-for-byte unchanged.
pub fn run_fails(env: &FerryEnv, pkg: &Path) -> Output {
    run_fails_with(env, pkg, &[])
}

/// [`run_fails`] with more arguments for `ferry run`.
pub fn run_fails_with(env: &FerryEnv, pkg: &Path, extra: &[&str]) -> Output {
    let before = std::fs::read(pkg).unwrap();
    let child = env
        .cmd()
        .args(["run", "--package", pkg.to_str().unwrap(), "--name", "t-bad"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop::new(child);
    wait_until(
        Duration::from_secs(60),
        "ferry run to refuse the package",
        || child.try_wait().unwrap(),
    );
    let out = child.into_inner().wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        std::fs::read(pkg).unwrap() == before,
        "the package is byte-for-byte unchanged"
    );
    assert!(qemu_pids("t-bad").is_empty());
    assert!(!env.vm_dir("t-bad").exists());
    out
}

/// An HTTP request with an optional JSON body (and a bearer `token`, for
/// the boot service's writes): the status and the body as text. Statuses
/// are answers, not errors; a request takes at most 10 s.
pub fn http_json(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
) -> (u16, String) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        b = b.header("Authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        b = b.header("Content-Type", "application/json");
    }
    let req = b
        .body(
            body.map(|v| serde_json::to_vec(v).unwrap())
                .unwrap_or_default(),
        )
        .unwrap();
    let mut r = agent.run(req).unwrap();
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// GET `url` (with a bearer `token` if given): the body as JSON, which
/// must come with 200.
pub fn get_json(url: &str, token: Option<&str>) -> serde_json::Value {
    let (code, body) = http_json("GET", url, None, token);
    assert_eq!(code, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
}

/// A file's SHA-256 as hex (`sha256sum`), for `#sha256=` URLs.
pub fn sha256_hex(path: &Path) -> String {
    sha256sum_output(std::process::Command::new("sha256sum").arg(path))
}

/// The digest `sha256sum` prints as the first word of `command`'s output
/// (the command is or ends in `sha256sum`); the command must succeed.
pub fn sha256sum_output(command: &mut std::process::Command) -> String {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A boot service store under `env`'s state directory serving the `node`
/// blueprint `bp` (`files/vmlinuz`, `files/initramfs.cpio.gz`,
/// `files/node.ext4`, hard links where possible), and a token file holding
/// `token`: `(store, token file)`.
pub fn node_boot_store(
    env: &FerryEnv,
    bp: &ferry_blueprint::Blueprint,
    token: &str,
) -> (PathBuf, PathBuf) {
    let store = env.state.path().join("bss-store");
    let files = store.join("files");
    std::fs::create_dir_all(&files).unwrap();
    for (name, from) in [
        ("vmlinuz", bp.kernel()),
        ("initramfs.cpio.gz", bp.initramfs()),
        ("node.ext4", bp.disk()),
    ] {
        std::fs::hard_link(&from, files.join(name))
            .or_else(|_| std::fs::copy(&from, files.join(name)).map(|_| ()))
            .unwrap();
    }
    let token_file = env.state.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    (store, token_file)
}

/// A clear line, exit code 3, and no VM: nothing in the state directory,
/// no QEMU. Returns the line.
pub fn assert_refused(env: &FerryEnv, out: &Output, name: &str, says: &str) -> String {
    assert_eq!(out.status.code(), Some(3), "{}", describe(out));
    let line = error_line(out);
    assert!(line.contains(says), "{line:?} should say {says:?}");
    assert!(!env.vm_dir(name).exists(), "no VM directory is left");
    assert!(qemu_pids(name).is_empty(), "no QEMU was started");
    line
}
