//! The section cache: package sections extracted once, by digest, under
//! `$FERRY_CACHE/sections`, shared by every run of every package with that
//! content (and by clones, which map the memory section privately).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_package::{Package, SectionKind};
use ferry_transport::RemotePackage;

use crate::error::{FileError, StartError};

/// Extracted package sections, by digest, under `$FERRY_CACHE/sections`.
pub(crate) struct SectionCache {
    dir: PathBuf,
}

impl SectionCache {
    pub(crate) fn new(cache: &Path) -> Self {
        Self {
            dir: cache.join("sections"),
        }
    }

    pub(crate) fn path(&self, kind: SectionKind, digest: &str) -> PathBuf {
        self.dir.join(format!("{kind}-{digest}"))
    }

    /// The section as a file, extracting (and verifying) it the first time.
    pub(crate) fn get(&self, pkg: &Package, kind: SectionKind) -> Result<PathBuf, StartError> {
        let digest = pkg.section(kind)?.digest.clone();
        let path = self.path(kind, &digest);
        if !path.exists() {
            crate::paths::private_dir(&self.dir).map_err(FileError::at(&self.dir))?;
            let t = Instant::now();
            pkg.extract(kind, &path, &mut |_, _| {})?;
            tracing::info!(section = %kind, ms = t.elapsed().as_millis() as u64, "extracted into the cache");
        }
        Ok(path)
    }

    /// Removes the entry of an old content (a clone still running from it
    /// keeps its open file; later runs extract again).
    pub(crate) fn forget(&self, kind: SectionKind, digest: &str) {
        let _ = std::fs::remove_file(self.path(kind, digest));
    }

    /// Moves `file` (whose content is section `kind` with `digest`) into the
    /// cache, if it is not there yet.
    pub(crate) fn adopt(&self, kind: SectionKind, digest: &str, file: &Path) {
        let path = self.path(kind, digest);
        if !path.exists() && std::fs::rename(file, &path).is_err() {
            tracing::debug!(
                "cache on another file system: not adopting {}",
                file.display()
            );
        }
    }
}

impl SectionCache {
    /// The section of a remote package as a file: fetched chunk by chunk
    /// (each checked against its sha256) into a temporary file beside the
    /// entry, then renamed, the first time. `progress` gets bytes done and
    /// the total.
    pub(crate) fn get_remote(
        &self,
        pkg: &RemotePackage,
        kind: SectionKind,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf, StartError> {
        use std::io::{Seek, SeekFrom, Write};
        let info = pkg.section(kind)?;
        let path = self.path(kind, &info.digest);
        if path.exists() {
            return Ok(path);
        }
        crate::paths::private_dir(&self.dir).map_err(FileError::at(&self.dir))?;
        let part = path.with_extension(format!("part-{}", std::process::id()));
        let t = Instant::now();
        let result = (|| -> Result<(), StartError> {
            let mut file = crate::paths::private_file(&part).map_err(FileError::at(&part))?;
            file.set_len(info.size).map_err(FileError::at(&part))?;
            let mut done = 0u64;
            for index in 0..info.chunk_count() {
                let len = info.chunk_len(index).unwrap_or(0);
                if info.chunks[index].is_some() {
                    let bytes = pkg.read_chunk(kind, index)?;
                    file.seek(SeekFrom::Start(index as u64 * info.chunk_size))
                        .and_then(|_| file.write_all(&bytes))
                        .map_err(FileError::at(&part))?;
                }
                done += len;
                progress(done, info.size);
            }
            file.sync_all().map_err(FileError::at(&part))?;
            Ok(std::fs::rename(&part, &path).map_err(FileError::at(&path))?)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        result?;
        tracing::info!(section = %kind, ms = t.elapsed().as_millis() as u64, "fetched into the cache");
        Ok(path)
    }
}

/// Packages whose every chunk was checked, remembered in the cache's memo
/// ([`ferry_engine::memo`]) by the package file's identity (path, device,
/// inode, size, modification and status-change times), so that a package
/// run again from a warm cache is not hashed again beside each resume (it
/// took the guest's CPU and held `live` back by over a second, issue 12).
/// Any write to the file moves its status-change time, which user space
/// cannot set back, so a changed package is checked again.
pub(crate) struct VerifiedPackages {
    cache: PathBuf,
}

/// The memo kind of a package checked in full.
const CHECKED: &str = "package-checked";

impl VerifiedPackages {
    pub(crate) fn new(cache: &Path) -> Self {
        Self {
            cache: cache.to_path_buf(),
        }
    }

    /// The stamp `package` has while it is unchanged, or `None` if it
    /// cannot be read.
    pub(crate) fn stamp(&self, package: &Path) -> Option<PathBuf> {
        ferry_engine::memo::path(&self.cache, CHECKED, package)
    }

    /// Whether `stamp` (from [`Self::stamp`], taken now) says the package
    /// was checked as it is. Read, not only looked up: a read marks the
    /// memo used, so a package run every day is not checked again when
    /// the memo directory is pruned ([`ferry_engine::memo::prune`]).
    pub(crate) fn known(stamp: Option<&Path>) -> bool {
        stamp.is_some_and(|p| std::fs::read(p).is_ok())
    }

    /// Remembers that the package was checked as it was when `stamp` was
    /// taken (before the check began: a package changed during the check
    /// has another identity by now, and is checked again next time).
    pub(crate) fn remember(&self, stamp: &Path) {
        ferry_engine::memo::keep(stamp, b"every chunk checked\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_package_is_known_until_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("p.ferry");
        std::fs::write(&pkg, b"package").unwrap();
        let v = VerifiedPackages::new(&dir.path().join("cache"));
        let stamp = v.stamp(&pkg).unwrap();
        assert!(!VerifiedPackages::known(Some(&stamp)));
        v.remember(&stamp);
        assert!(VerifiedPackages::known(v.stamp(&pkg).as_deref()));
        // Same size and contents, written again: checked again.
        std::fs::write(&pkg, b"package").unwrap();
        assert!(!VerifiedPackages::known(v.stamp(&pkg).as_deref()));
        assert!(!VerifiedPackages::known(
            v.stamp(&dir.path().join("gone")).as_deref()
        ));
    }
}
