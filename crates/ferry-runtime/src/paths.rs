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
    /// VMs without `--netns` get a private namespace `<net_prefix>-<name>`
    /// (`$FERRY_NET_PREFIX`, default `ferry`).
    pub net_prefix: String,
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
