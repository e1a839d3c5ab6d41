//! How ferry confines each QEMU process: QEMU's own seccomp sandbox, and,
//! when ferry runs as root, an unprivileged user and a cgroup of its own
//! (`docs/security.md`, "Confined engine").
//!
//! Confinement is on by default; `FERRY_CONFINE=0` turns all of it off, for
//! debugging QEMU itself (e.g. to attach a debugger or let it spawn).

use crate::cgroup::CgroupParent;

/// The environment variable that turns confinement off (`0`).
pub const CONFINE_ENV: &str = "FERRY_CONFINE";

/// Memory QEMU gets beyond its guest's RAM, in MiB, unless
/// `$FERRY_QEMU_MEMORY_OVERHEAD_MIB` says otherwise: QEMU's own heap, its
/// threads' stacks, and under TCG the translation cache (capped at
/// [`TCG_TB_SIZE_MIB`]). Measured in `docs/security.md`.
pub const MEMORY_OVERHEAD_MIB: u64 = 256;

/// The environment variable that sets [`MEMORY_OVERHEAD_MIB`] (for tests
/// and tuning; `0` leaves QEMU nothing beyond its guest's RAM).
pub const MEMORY_OVERHEAD_ENV: &str = "FERRY_QEMU_MEMORY_OVERHEAD_MIB";

/// The size of TCG's translation cache, in MiB, when QEMU is confined.
/// QEMU's default is 1 GiB, touched as the guest runs new code: more than
/// a small VM's memory limit should have to allow for.
pub const TCG_TB_SIZE_MIB: u64 = 64;

/// The most tasks (processes and threads) one QEMU may have: a vCPU
/// thread each, a few of its own, and its I/O thread pool (at most 64).
pub const PIDS_MAX: u64 = 256;

/// What confines the QEMU processes of one engine.
#[derive(Debug, Clone)]
pub struct Confine {
    /// `-sandbox` with [`crate::vm::SANDBOX`].
    pub sandbox: bool,
    /// Where each VM's cgroup goes, when ferry may make cgroups.
    pub cgroup: Option<CgroupParent>,
    /// Memory beyond the guest's RAM, in bytes.
    pub memory_overhead: u64,
}

impl Confine {
    /// No confinement at all.
    pub fn off() -> Self {
        Confine {
            sandbox: false,
            cgroup: None,
            memory_overhead: 0,
        }
    }

    /// From `$FERRY_CONFINE` (anything but `0`, or unset: on). The seccomp
    /// sandbox is on for everyone; a cgroup needs root.
    pub fn from_env() -> Self {
        if std::env::var(CONFINE_ENV).is_ok_and(|v| v == "0") {
            return Self::off();
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let cgroup = if root {
            match CgroupParent::of_self() {
                Ok(p) => Some(p),
                Err(why) => {
                    tracing::warn!("QEMU runs without a cgroup of its own: {why}");
                    None
                }
            }
        } else {
            None
        };
        let overhead_mib = std::env::var(MEMORY_OVERHEAD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MEMORY_OVERHEAD_MIB);
        Confine {
            sandbox: true,
            cgroup,
            memory_overhead: overhead_mib << 20,
        }
    }

    /// Whether QEMU's translation cache is capped (see [`TCG_TB_SIZE_MIB`]).
    pub fn caps_tcg_cache(&self) -> bool {
        self.cgroup.is_some()
    }
}
