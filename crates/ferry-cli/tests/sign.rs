//! Package authenticity with real QEMU: `ferry key gen`, `ferry package
//! --sign`, `--trust` on `run` and `peer`, and `#sha256=` pins on registry
//! URLs. A package that is unsigned, signed by another key, re-packed after
//! signing or not the pinned one is refused with one line naming the fix,
//! before anything of it runs, and is left unchanged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_package::{Package, SecretKey, SIGNATURE_BLOCK_LEN};
use ferry_test_support::{
    blueprint, describe, qemu_pids, spawn_until, spawn_until_live, vm_lock, FerryEnv,
};
use sha2::{Digest, Sha256};

mod common;
use common::{copy_of_package, env, error_line, rewrite_with, run_fails_with, stop, tiny_package};

/// `ferry key gen --out STATE/NAME`: the paths of NAME.key and NAME.pub.
fn key_gen(env: &FerryEnv, name: &str) -> (PathBuf, PathBuf) {
    let prefix = env.state.path().join(name);
    let out = env.run(&["key", "gen", "--out", prefix.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    (prefix.with_extension("key"), prefix.with_extension("pub"))
}

/// A copy of the tiny package signed, through the library, with the
/// secret key in `key_file`.
fn signed_copy(env: &FerryEnv, key_file: &Path, name: &str) -> PathBuf {
    let key = SecretKey::load(key_file).unwrap();
    let dst = env.state.path().join(name);
    rewrite_with(&tiny_package(env), &dst, |_| {}, None, Some(&key));
    dst
}

/// Where the table is, from the header.
fn table_at(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize
}

/// Replaces `from` by `to` (same length) in the package's table and fixes
/// the table and header checksums: a re-packed package whose own checks
/// all pass.
fn edit_table(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let off = table_at(&bytes);
    let len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let table = &mut bytes[off..off + len];
    let at = table
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} is not in the table"));
    table[at..at + to.len()].copy_from_slice(to.as_bytes());
    let sum = Sha256::digest(&bytes[off..off + len]);
    bytes[32..64].copy_from_slice(&sum);
    let sum = Sha256::digest(&bytes[..64]);
    bytes[64..96].copy_from_slice(&sum);
    std::fs::write(path, bytes).unwrap();
}

/// The signature block of a signed package.
fn block_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let off = table_at(bytes);
    off - SIGNATURE_BLOCK_LEN as usize..off
}

#[test]
fn key_files_are_typed_private_and_never_replaced() {
    let _limit = ferry_test_support::watchdog::time_limit(Duration::from_secs(60));
    let env = env();
    let (key, public) = key_gen(&env, "release");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&public), 0o644);
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("ferry-ed25519-key v1\n"));

    // Never over an existing pair.
    let prefix = env.state.path().join("release");
    let before = std::fs::read(&key).unwrap();
    let out = env.run(&["key", "gen", "--out", prefix.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("exists already"),
        "{}",
        describe(&out)
    );
    assert_eq!(std::fs::read(&key).unwrap(), before);

    // --json: one object, with the key id.
    let prefix = env.state.path().join("other");
    let out = env.run(&["--json", "key", "gen", "--out", prefix.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["key_id"].as_str().unwrap().len(), 16, "{v}");

    // The wrong half of the pair, before anything else is done.
    let out = env.run(&[
        "run",
        "--package",
        "/nonexistent.ferry",
        "--trust",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("is not a ferry public key"),
        "{}",
        describe(&out)
    );
    // A live migration carries no package to check.
    let out = env.run(&[
        "peer",
        "--from",
        "127.0.0.1:9",
        "--trust",
        public.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("--trust checks packages from a registry"),
        "{}",
        describe(&out)
    );
    // A secret key others can read is not used to sign (before any boot).
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&[
        "package",
        "--blueprint",
        "/nonexistent",
        "--out",
        env.state.path().join("x.ferry").to_str().unwrap(),
        "--sign",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(error_line(&out).contains("chmod 600"), "{}", describe(&out));
}

/// `ferry package --sign`, then `ferry run --trust`: the signed package
/// runs; an unsigned one and one signed by another key are refused.
#[test]
fn a_signed_package_runs_under_trust_and_others_are_refused() {
    let _lock = vm_lock();
    let env = env();
    let (key, public) = key_gen(&env, "k");
    let (_, other_public) = key_gen(&env, "other");
    let signed = env.state.path().join("signed.ferry");
    let bp = blueprint("tiny");
    let out = env.run(&[
        "package",
        "--blueprint",
        bp.to_str().unwrap(),
        "--out",
        signed.to_str().unwrap(),
        "--sign",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let key_id = SecretKey::load(&key).unwrap().public_key().key_id();

    let out = env.run(&["inspect", signed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("signature: ed25519, key id {key_id}\n")),
        "{text}"
    );
    let out = env.run(&["--json", "inspect", signed.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["signature"]["key_id"], key_id.as_str(), "{v}");
    assert_eq!(v["signature"]["valid"], true, "{v}");

    // Trusted: it runs (a clone, so that the package stays as signed).
    let args = [
        "run",
        "--package",
        signed.to_str().unwrap(),
        "--clone",
        "--name",
        "s1",
        "--trust",
        other_public.to_str().unwrap(),
        "--trust",
        public.to_str().unwrap(),
    ];
    let (mut run, _) = spawn_until_live(&env, &args, Duration::from_secs(120));
    let out = stop(&mut run);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(qemu_pids("s1").is_empty());

    // Unsigned.
    let unsigned = copy_of_package(&env, "unsigned.ferry");
    let out = run_fails_with(&env, &unsigned, &["--trust", public.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(
        error_line(&out),
        format!(
            "ferry: package {} is not signed by a trusted key (it carries no signature): sign it with `ferry package --sign KEY`, or drop --trust",
            unsigned.display()
        )
    );

    // The same refusal, before any supervisor starts, from `run --detach`
    // and `up`.
    for args in [
        vec!["run", "--detach", "--name", "t-bad"],
        vec!["up", "-n", "1", "--name-prefix", "t-bad"],
    ] {
        let out = env
            .cmd()
            .args(&args)
            .args(["--package", unsigned.to_str().unwrap()])
            .args(["--trust", public.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", describe(&out));
        assert!(
            error_line(&out).contains("is not signed by a trusted key"),
            "{args:?}: {}",
            describe(&out)
        );
        assert!(qemu_pids("t-bad").is_empty() && qemu_pids("t-bad-0").is_empty());
    }

    // Signed, but by a key not trusted.
    let out = run_fails_with(&env, &signed, &["--trust", other_public.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains(&format!("is signed by key {key_id}")) && line.contains("--trust"),
        "{line}"
    );
}

/// The attack: a re-packed package with a valid internal table (it opens
/// and verifies) but a signature that is not its own: the original's over
/// a changed table, or one taken from another package. Without `--trust`
/// nothing tells it from the real one; with it, it is refused.
#[test]
fn repacked_packages_are_refused_under_trust() {
    let _lock = vm_lock();
    let env = env();
    let (key, public) = key_gen(&env, "k");
    let (other_key, _) = key_gen(&env, "other");
    let signed = signed_copy(&env, &key, "signed.ferry");

    // The table changed after signing, every checksum fixed up.
    let tampered = env.state.path().join("tampered.ferry");
    std::fs::copy(&signed, &tampered).unwrap();
    edit_table(&tampered, "\"recipe\":\"tiny\"", "\"recipe\":\"tinz\"");
    let out = env.run(&["inspect", "--verify", tampered.to_str().unwrap()]);
    assert!(out.status.success(), "a valid package: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("INVALID: it does not match this package"),
        "{}",
        describe(&out)
    );
    let out = run_fails_with(&env, &tampered, &["--trust", public.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains("is not signed by a trusted key")
            && line.contains("changed or re-packed after signing")
            && line.contains("ferry package --sign KEY"),
        "{line}"
    );

    // Another package (its own valid table, another command line) wearing
    // the signed package's signature block.
    let grafted = env.state.path().join("grafted.ferry");
    let other = SecretKey::load(&other_key).unwrap();
    rewrite_with(
        &signed,
        &grafted,
        |m| m.cmdline.push_str(" quiet"),
        None,
        Some(&other),
    );
    let good = std::fs::read(&signed).unwrap();
    let mut bytes = std::fs::read(&grafted).unwrap();
    let (from, to) = (block_range(&good), block_range(&bytes));
    bytes[to].copy_from_slice(&good[from]);
    std::fs::write(&grafted, bytes).unwrap();
    Package::open(&grafted)
        .unwrap()
        .verify(&mut |_, _| {})
        .unwrap();
    let out = run_fails_with(&env, &grafted, &["--trust", public.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        error_line(&out).contains("changed or re-packed after signing"),
        "{}",
        describe(&out)
    );
}

/// `ferry peer --from URL#sha256=…`: the pinned package runs, under
/// `--trust` too; another pin, or another signer, is refused before any
/// section is fetched.
#[test]
fn a_pinned_registry_url_runs_only_the_pinned_package() {
    let _lock = vm_lock();
    let env = env();
    let (key, public) = key_gen(&env, "k");
    let (_, other_public) = key_gen(&env, "other");
    let signed = signed_copy(&env, &key, "signed.ferry");
    let digest = Package::open(&signed).unwrap().index().table_sha256();
    let mut cmd = env.cmd();
    cmd.args([
        "registry",
        "--package",
        signed.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let (_registry, lines) = spawn_until(cmd, "listening on ", Duration::from_secs(60));
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("listening on http://"))
        .expect("an address")
        .to_string();
    let url = format!("http://{addr}/packages/signed.ferry");
    let saved = env.state.path().join("s2-saved.ferry");
    let peer_fails = |from: &str, extra: &[&str]| {
        let out = env
            .cmd()
            .args(["peer", "--from", from, "--net", "none", "--name", "s2"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        assert!(qemu_pids("s2").is_empty());
        assert!(!env.vm_dir("s2").exists());
        assert!(!saved.exists());
        error_line(&out)
    };

    // Another digest pinned: this is not the package meant.
    let wrong = "0".repeat(64);
    let line = peer_fails(&format!("{url}#sha256={wrong}"), &[]);
    assert_eq!(
        line,
        format!("ferry: package {url} is not the pinned one (its table sha256 is {digest}, the URL pins {wrong}): the server holds another package under this name; fetch the pinned package, or update the pin after checking the new one")
    );
    // The right pin, but a signer not trusted.
    let pinned = format!("{url}#sha256={digest}");
    let line = peer_fails(&pinned, &["--trust", other_public.to_str().unwrap()]);
    assert!(line.contains("is not signed by a trusted key"), "{line}");
    // A malformed pin is no pin: refused, not ignored.
    let line = peer_fails(&format!("{url}#sha256=abc"), &[]);
    assert!(line.contains("is not a sha256"), "{line}");

    // The right pin and a trusted signer: it runs.
    let (mut peer, _) = spawn_until_live(
        &env,
        &[
            "peer",
            "--from",
            &pinned,
            "--name",
            "s2",
            "--save",
            saved.to_str().unwrap(),
            "--trust",
            public.to_str().unwrap(),
        ],
        Duration::from_secs(180),
    );
    let out = stop(&mut peer);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(saved.exists());
}
