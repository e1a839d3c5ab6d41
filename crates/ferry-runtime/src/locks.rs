//! One `ferry run` per package: an exclusive lock under `$FERRY_STATE/locks`,
//! named after the package's real path. It lives outside the package's own
//! directory so that packages on read-only mounts can still be run.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{FileError, StartError};
use crate::Paths;

/// Held while a VM may write back into a package.
pub struct PackageLock(#[allow(dead_code)] File);

impl PackageLock {
    /// Takes the lock of `package`, or says which process holds it.
    pub fn acquire(paths: &Paths, package: &Path) -> Result<Self, StartError> {
        use sha2::Digest;
        let canon = std::fs::canonicalize(package).map_err(FileError::at(package))?;
        let dir = paths.state.join("locks");
        std::fs::create_dir_all(&dir).map_err(FileError::at(&dir))?;
        let key = hex::encode(sha2::Sha256::digest(canon.to_string_lossy().as_bytes()));
        let path = dir.join(format!("{}.lock", &key[..20]));
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(FileError::at(&path))?;
        // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(StartError::PackageInUse {
                path: canon,
                pid: pid.trim().to_string(),
            });
        }
        let _ = file.set_len(0);
        let _ =
            std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes());
        Ok(PackageLock(file))
    }
}
