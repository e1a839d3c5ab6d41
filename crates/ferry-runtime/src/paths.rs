//! Where ferry keeps things: `$FERRY_STATE` (default `/var/lib/ferry`) for
//! running VMs, `$FERRY_CACHE` (default `~/.cache/ferry`) for downloads and
//! verdicts that can be rebuilt.

use std::path::PathBuf;

/// ferry's directories.
#[derive(Debug, Clone)]
pub struct Paths {
    /// State: one directory per running VM under `vms/`.
    pub state: PathBuf,
    /// Cache: kernels, debootstrap trees, accelerator verdicts.
    pub cache: PathBuf,
}

impl Paths {
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
        Self { state, cache }
    }

    /// The directory holding one directory per VM.
    pub fn vms(&self) -> PathBuf {
        self.state.join("vms")
    }
}
