//! Where ferry keeps things: `$FERRY_STATE` (default `/var/lib/ferry`) for
//! running VMs, `$FERRY_CACHE` (default `~/.cache/ferry`) for downloads and
//! verdicts that can be rebuilt.

use std::path::PathBuf;

/// Makes `dir` (and any missing parent) with mode 0700, and sets 0700 on
/// `dir` if it was there: state and cache directories hold guest memory,
/// disks and control sockets, for their owner only.
pub(crate) fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates (or truncates) `path` with mode 0600: a file of guest memory or
/// disk.
pub(crate) fn private_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// ferry's directories.
#[derive(Debug, Clone)]
pub struct Paths {
    /// State: one directory per running VM under `vms/`.
    pub state: PathBuf,
    /// Cache: kernels, debootstrap trees, accelerator verdicts.
    pub cache: PathBuf,
    /// VMs without `--netns` get a private namespace `<net_prefix>-<name>`
    /// (`$FERRY_NET_PREFIX`, default `ferry`).
    pub net_prefix: String,
}

impl Paths {
    /// The environment that makes [`Paths::from_env`] in another ferry
    /// process (a detached VM's supervisor) give these paths, made absolute
    /// (that process starts in `/`). A library caller's paths need not be
    /// its own environment's.
    pub fn env_vars(&self) -> [(&'static str, std::ffi::OsString); 3] {
        let absolute = |p: &PathBuf| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .into_os_string()
        };
        [
            ("FERRY_STATE", absolute(&self.state)),
            ("FERRY_CACHE", absolute(&self.cache)),
            ("FERRY_NET_PREFIX", self.net_prefix.clone().into()),
        ]
    }

    /// From the environment, with the documented defaults.
    pub fn from_env() -> Self {
        let state = std::env::var_os("FERRY_STATE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/ferry"));
        let cache = std::env::var_os("FERRY_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| "/root".into());
                home.join(".cache/ferry")
            });
        let net_prefix = std::env::var("FERRY_NET_PREFIX").unwrap_or_else(|_| "ferry".into());
        Self {
            state,
            cache,
            net_prefix,
        }
    }

    /// The directory holding one directory per VM.
    pub fn vms(&self) -> PathBuf {
        self.state.join("vms")
    }
}
