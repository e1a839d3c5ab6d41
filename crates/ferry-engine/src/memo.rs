//! Facts about files that are slow to learn, remembered in ferry's cache:
//! a QEMU binary's version (`--version` starts the whole emulator: 15 ms
//! on an idle host, hundreds on a busy one), a file's SHA-256 (the key of
//! the accelerator verdict hashes the 14 MB kernel; a live move's offer
//! names the kernel and initramfs by digest, and its destination checks
//! what arrives) and a disk's copy-on-write overlay (a `qemu-img` run).
//! Every VM start needed the first and last before its engine ran, and
//! every move hashed 17 MB on each side (issue 12: ferry's overhead down to
//! the engine's own; in the KVM lab, whose CPU is emulated, the hashing
//! and the version took seconds of a move's set-up, beside a guest they
//! starved). The host's TSC frequency (20 ms to measure) is remembered per
//! boot. A blueprint's files are checked against their manifest through the
//! same digests, and a package checked in full is remembered here too.
//!
//! It lives beside the engine interface because the engine (QEMU's version,
//! the kernel's digest) and the runtime (a move's digests) share the
//! facts: a kernel hashed for the accelerator's verdict is not hashed again
//! for the offer.
//!
//! A fact is keyed by the file's identity ([`crate::file_identity`]): its
//! path, device, inode, size, modification and status-change times. The
//! status-change time moves on every write and cannot be set from user
//! space, so a file changed since is learnt again. Nothing here is trusted
//! beyond that: a memo that cannot be read or written is learnt again, or
//! not kept.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The memo of `kind` for `file` under `cache_dir`, or `None` if `file`
/// cannot be read.
pub fn path(cache_dir: &Path, kind: &str, file: &Path) -> Option<PathBuf> {
    let identity = format!("{kind}|{}", crate::file_identity(file)?);
    let key = hex::encode(Sha256::digest(identity.as_bytes()));
    Some(
        cache_dir
            .join("memo")
            .join(format!("{kind}-{}", &key[..32])),
    )
}

/// What `learn` says about `file`, from the memo when there is one.
pub fn text(
    cache_dir: &Path,
    kind: &str,
    file: &Path,
    learn: impl FnOnce() -> Option<String>,
) -> Option<String> {
    let memo = path(cache_dir, kind, file);
    if let Some(known) = memo
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .filter(|t| !t.is_empty())
    {
        return Some(known);
    }
    let learnt = learn()?;
    if let Some(p) = memo {
        keep(&p, learnt.as_bytes());
    }
    Some(learnt)
}

/// What `learn` says about this host until it boots again, from the memo
/// when there is one. The memo is keyed by the kernel's boot id, so a fact
/// that holds for one boot (the TSC's frequency) is learnt once per boot,
/// not once per ferry process; without a boot id it is learnt every time.
pub fn this_boot(
    cache_dir: &Path,
    kind: &str,
    learn: impl FnOnce() -> Option<String>,
) -> Option<String> {
    let boot_id = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
    let boot_id = boot_id.trim();
    if boot_id.is_empty() || !boot_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return learn();
    }
    let memo = cache_dir.join("memo").join(format!("{kind}-{boot_id}"));
    if let Some(known) = std::fs::read_to_string(&memo)
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Some(known.trim().to_owned());
    }
    let learnt = learn()?;
    keep(&memo, learnt.as_bytes());
    Some(learnt)
}

/// The memo kind of a file's SHA-256.
const SHA256: &str = "sha256";

/// The SHA-256 of `file`'s content, as 64 lowercase hex digits, from the
/// memo when there is one; hashed (streaming) and remembered otherwise.
pub fn sha256(cache_dir: &Path, file: &Path) -> std::io::Result<String> {
    let memo = path(cache_dir, SHA256, file);
    if let Some(known) = memo.as_ref().and_then(|p| recall_sha256(p)) {
        return Ok(known);
    }
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(file)?, &mut hasher)?;
    let digest = hex::encode(hasher.finalize());
    if let Some(p) = memo {
        keep(&p, digest.as_bytes());
    }
    Ok(digest)
}

/// Remembers `digest` as the SHA-256 of `file`, which the caller has just
/// hashed itself (a blob checked as it arrived), so that [`sha256`] does
/// not read it again.
pub fn remember_sha256(cache_dir: &Path, file: &Path, digest: &str) {
    if !is_sha256_hex(digest) {
        return;
    }
    if let Some(p) = path(cache_dir, SHA256, file) {
        keep(&p, digest.as_bytes());
    }
}

/// A remembered digest, if the memo holds one (anything else is learnt
/// again).
fn recall_sha256(memo: &Path) -> Option<String> {
    let text = std::fs::read_to_string(memo).ok()?;
    is_sha256_hex(&text).then_some(text)
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random id for every boot of the host's kernel.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Writes `bytes` to `memo` beside, then renames: a reader never sees half
/// of it. Failures are only logged (the fact is learnt again next time).
pub fn keep(memo: &Path, bytes: &[u8]) {
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = memo.parent().expect("memo paths have a parent");
        // Private, as the rest of ferry's cache (docs/security.md).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let name = memo.file_name().expect("memo paths have a name");
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| std::fs::rename(&tmp, memo));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    };
    if let Err(e) = write() {
        tracing::debug!("not remembering {}: {e}", memo.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fact_is_learnt_once_and_again_after_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernel");
        std::fs::write(&file, b"one").unwrap();
        let cache = dir.path().join("cache");
        let mut learnt = 0;
        let ask = |learnt: &mut u32| {
            text(&cache, "digest", &file, || {
                *learnt += 1;
                Some(format!("{}", std::fs::read(&file).unwrap().len()))
            })
        };
        assert_eq!(ask(&mut learnt).as_deref(), Some("3"));
        assert_eq!(ask(&mut learnt).as_deref(), Some("3"));
        assert_eq!(learnt, 1, "the second answer came from the memo");
        std::fs::write(&file, b"three").unwrap();
        assert_eq!(ask(&mut learnt).as_deref(), Some("5"));
        assert_eq!(learnt, 2, "a changed file is learnt again");
        assert_eq!(
            text(&cache, "digest", &dir.path().join("missing"), || None),
            None
        );
    }
    #[test]
    fn a_digest_is_hashed_once_and_again_after_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let file = dir.path().join("initramfs");
        std::fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256(&cache, &file).unwrap(), abc);
        let memo = path(&cache, SHA256, &file).unwrap();
        assert_eq!(std::fs::read_to_string(&memo).unwrap(), abc);
        // The second answer comes from the memo: a planted one shows it.
        let planted = "0".repeat(64);
        keep(&memo, planted.as_bytes());
        assert_eq!(sha256(&cache, &file).unwrap(), planted);
        // A memo that is not a digest is not believed.
        keep(&memo, b"not a digest");
        assert_eq!(sha256(&cache, &file).unwrap(), abc);
        // A changed file is hashed again.
        std::fs::write(&file, b"abcd").unwrap();
        assert_eq!(
            sha256(&cache, &file).unwrap(),
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
        // What a caller hashed itself is remembered, if it is a digest.
        let other = dir.path().join("kernel");
        std::fs::write(&other, b"abc").unwrap();
        remember_sha256(&cache, &other, "not hex");
        assert!(!path(&cache, SHA256, &other).unwrap().exists());
        remember_sha256(&cache, &other, &planted);
        assert_eq!(sha256(&cache, &other).unwrap(), planted);
        // A file that cannot be read is an error, not a digest.
        assert!(sha256(&cache, &dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_fact_about_this_boot_is_learnt_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut learnt = 0;
        let mut ask = || {
            this_boot(dir.path(), "tsc-khz", || {
                learnt += 1;
                Some("2596142".to_owned())
            })
        };
        assert_eq!(ask().as_deref(), Some("2596142"));
        assert_eq!(ask().as_deref(), Some("2596142"));
        assert_eq!(learnt, 1, "the second answer came from the memo");
        let boot_id = std::fs::read_to_string(BOOT_ID).unwrap();
        let memo = dir
            .path()
            .join("memo")
            .join(format!("tsc-khz-{}", boot_id.trim()));
        assert_eq!(std::fs::read_to_string(memo).unwrap(), "2596142");
        // What cannot be learnt is not remembered.
        assert_eq!(this_boot(dir.path(), "nothing", || None), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("memo")).unwrap().count(),
            1
        );
    }
}
