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
//!
//! Every new file identity leaves a memo, so the directory is pruned (see
//! [`prune`]) at most once a day, when a memo is kept: a fact not used for
//! [`MAX_AGE`] costs only its learning again, should it be asked for.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
    let Some(boot_id) = boot_id() else {
        return learn();
    };
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
    let (digest, _) = hash_file(file)?;
    if let Some(p) = memo {
        keep(&p, digest.as_bytes());
    }
    Ok(digest)
}

/// The SHA-256 of `file`'s content, as 64 lowercase hex digits, and its
/// size, from one streaming read; nothing is remembered (see [`sha256`]).
pub fn hash_file(file: &Path) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    // Read a megabyte at a time: a disk image is a gigabyte.
    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?);
    let size = std::io::copy(&mut reader, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// Remembers `digest` as the SHA-256 of `file`, which the caller knows
/// (a blob checked as it arrived, or named by its digest in ferry's blob
/// cache), so that [`sha256`] does not read it again. A memo that already
/// says so is read (which keeps it), not written again.
pub fn remember_sha256(cache_dir: &Path, file: &Path, digest: &str) {
    if !is_sha256_hex(digest) {
        return;
    }
    if let Some(p) = path(cache_dir, SHA256, file) {
        if recall_sha256(&p).as_deref() != Some(digest) {
            keep(&p, digest.as_bytes());
        }
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

/// This boot's id ([`BOOT_ID`]), if it can be read and is fit for a file
/// name (hex digits and dashes).
fn boot_id() -> Option<String> {
    let text = std::fs::read_to_string(BOOT_ID).ok()?;
    let id = text.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then(|| id.to_owned())
}

/// How long a memo is kept after it was last used. Under the default
/// `relatime` mount option a read marks a file accessed at most once a
/// day, which is what "used" means here; on a `noatime` file system a memo
/// is learnt again once this long after it was written.
pub const MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often [`keep`] prunes the directory.
const PRUNE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// A half-written memo (its writer died before the rename) older than this
/// is removed.
const TMP_MAX_AGE: Duration = Duration::from_secs(3600);

/// The file whose modification time says when the directory was pruned.
const PRUNED_MARK: &str = ".pruned";

/// Removes from `cache_dir`'s memo directory what will not be used again or
/// has not been used for [`MAX_AGE`] as of `now`: a fact of another boot of
/// the host ([`this_boot`]), a memo neither read nor written for that long
/// (its file is gone, replaced or idle), a half-written memo an hour old.
/// Returns how many files it removed. Nothing else in the cache is touched.
pub fn prune(cache_dir: &Path, now: SystemTime) -> usize {
    prune_dir(&cache_dir.join("memo"), now)
}

/// [`prune`] of the memo directory `dir` itself.
fn prune_dir(dir: &Path, now: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let boot_id = boot_id();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if name == PRUNED_MARK || !meta.is_file() {
            continue;
        }
        let age = |t: std::io::Result<SystemTime>| {
            t.ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default()
        };
        // Used: written, or read (atime), whichever was last.
        let unused_for = age(meta.modified()).min(age(meta.accessed()));
        let stale = if name.starts_with('.') && name.ends_with(".tmp") {
            unused_for > TMP_MAX_AGE
        } else if let Some(id) = boot_id_suffix(&name) {
            boot_id.as_deref().is_some_and(|now| id != now)
        } else {
            unused_for > MAX_AGE
        };
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The boot id a [`this_boot`] memo's name ends with (`KIND-` and a UUID),
/// if it is one.
fn boot_id_suffix(name: &str) -> Option<&str> {
    let id = name.get(name.len().checked_sub(36)?..)?;
    let dashes = [8, 13, 18, 23];
    let uuid = id.bytes().enumerate().all(|(i, b)| {
        if dashes.contains(&i) {
            b == b'-'
        } else {
            b.is_ascii_hexdigit()
        }
    });
    (uuid && name[..name.len() - 36].ends_with('-')).then_some(id)
}

/// Prunes `memo_dir`'s cache at most once every [`PRUNE_EVERY`]. The mark
/// is moved before the prune, so that concurrent keepers do not all prune.
fn prune_when_due(memo_dir: &Path) {
    let mark = memo_dir.join(PRUNED_MARK);
    let due = std::fs::metadata(&mark)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|since| since >= PRUNE_EVERY);
    if !due {
        return;
    }
    let marked = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&mark)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if marked.is_err() {
        return;
    }
    let removed = prune_dir(memo_dir, SystemTime::now());
    tracing::debug!(removed, "pruned {}", memo_dir.display());
}

/// Writes `bytes` to `memo` beside, then renames: a reader never sees half
/// of it. Failures are only logged (the fact is learnt again next time).
/// Now and then (once a day) the directory is pruned ([`prune`]).
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
        return;
    }
    if let Some(dir) = memo.parent() {
        prune_when_due(dir);
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
        // Hashing without the memo gives the size too.
        assert_eq!(
            hash_file(&file).unwrap(),
            (
                "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589".to_string(),
                4
            )
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

    /// Sets `file`'s access and modification times to these long ago.
    fn set_times(file: &Path, accessed_ago: Duration, modified_ago: Duration) {
        let now = SystemTime::now();
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_accessed(now - accessed_ago)
                    .set_modified(now - modified_ago),
            )
            .unwrap();
    }

    #[test]
    fn pruning_removes_what_will_not_be_used_again_and_keeps_the_rest() {
        let cache = tempfile::tempdir().unwrap();
        let memo = cache.path().join("memo");
        let boot_id = std::fs::read_to_string(BOOT_ID).unwrap();
        let boot_id = boot_id.trim();
        let day = Duration::from_secs(24 * 3600);
        let files = [
            // (name, unused for, kept)
            ("sha256-0123456789abcdef0123456789abcdef", day, true),
            (
                "sha256-fedcba9876543210fedcba9876543210",
                MAX_AGE + day,
                false,
            ),
            (&format!("tsc-khz-{boot_id}"), 40 * day, true),
            (
                "tsc-khz-01234567-89ab-cdef-0123-456789abcdef",
                Duration::ZERO,
                false,
            ),
            (".overlay-0123.4242.tmp", 2 * TMP_MAX_AGE, false),
            (".overlay-4567.4242.tmp", Duration::from_secs(60), true),
        ];
        for (name, ago, _) in &files {
            keep(&memo.join(name), b"x");
            set_times(&memo.join(name), *ago, *ago);
        }
        // A memo read recently is used, whenever it was written.
        let read = "qemu-version-00000000000000000000000000000000";
        keep(&memo.join(read), b"10.0.2");
        set_times(&memo.join(read), day, 2 * MAX_AGE);
        assert_eq!(prune(cache.path(), SystemTime::now()), 3);
        for (name, _, kept) in &files {
            assert_eq!(memo.join(name).exists(), *kept, "{name}");
        }
        assert!(memo.join(read).exists());
        // Nothing else in the cache is touched; a cache without memos is
        // nothing to prune.
        assert_eq!(prune(&cache.path().join("none"), SystemTime::now()), 0);
    }

    #[test]
    fn keeping_a_memo_prunes_once_a_day() {
        let cache = tempfile::tempdir().unwrap();
        let memo = cache.path().join("memo");
        let old = memo.join("sha256-fedcba9876543210fedcba9876543210");
        let age = |p: &Path| set_times(p, 2 * MAX_AGE, 2 * MAX_AGE);
        // The first keep prunes (no mark yet) and leaves the mark.
        keep(&old, b"x");
        age(&old);
        assert!(memo.join(PRUNED_MARK).exists());
        // Within the day, a keep does not prune.
        keep(&memo.join("sha256-0123456789abcdef0123456789abcdef"), b"y");
        assert!(old.exists(), "pruned twice within a day");
        // A day later it does.
        age(&memo.join(PRUNED_MARK));
        keep(&memo.join("sha256-0123456789abcdef0123456789abcdee"), b"z");
        assert!(!old.exists(), "not pruned after a day");
        assert_eq!(std::fs::read_dir(&memo).unwrap().count(), 3);
    }

    #[test]
    fn a_boot_id_suffix_is_a_uuid_after_a_dash() {
        let id = "01234567-89ab-cdef-0123-456789abcdef";
        assert_eq!(boot_id_suffix(&format!("tsc-khz-{id}")), Some(id));
        assert_eq!(boot_id_suffix(id), None);
        assert_eq!(
            boot_id_suffix("sha256-0123456789abcdef0123456789abcdef"),
            None
        );
        assert_eq!(
            boot_id_suffix("x-01234567-89ab-cdef-0123-456789abcdeg"),
            None
        );
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
        let memos = std::fs::read_dir(dir.path().join("memo"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != PRUNED_MARK)
            .count();
        assert_eq!(memos, 1);
    }
}
