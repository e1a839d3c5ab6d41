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
    /// The user QEMU runs as, when ferry runs as root and the user exists.
    pub user: Option<QemuUser>,
}

/// The unprivileged user QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuUser {
    /// Its uid.
    pub uid: u32,
    /// Its primary group, which ferry gives the files QEMU opens.
    pub gid: u32,
    /// The group that may open `/dev/kvm` (Debian: `kvm`), kept as QEMU's
    /// only supplementary group so that a confined QEMU can use KVM;
    /// `None` without the device or when it is open to everyone.
    pub kvm_gid: Option<u32>,
}

/// The group of `/dev/kvm` when that group may read and write it and
/// others may not.
fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/dev/kvm").ok()?;
    let mode = m.mode();
    (mode & 0o060 == 0o060 && mode & 0o006 != 0o006 && m.gid() != 0).then_some(m.gid())
}

/// The user `scripts/setup.sh` makes for QEMU (a system user, no login).
pub const QEMU_USER: &str = "ferry-qemu";

impl QemuUser {
    /// [`QEMU_USER`] from `/etc/passwd` (read as a file: no NSS), or why
    /// not.
    pub fn lookup() -> Result<Self, String> {
        let passwd = std::fs::read_to_string("/etc/passwd")
            .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
        passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() < 4 || f[0] != QEMU_USER {
                    return None;
                }
                Some(QemuUser {
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    kvm_gid: kvm_group(),
                })
            })
            .filter(|u| u.uid != 0 && u.gid != 0)
            .ok_or_else(|| format!("there is no user {QEMU_USER} (scripts/setup.sh makes it)"))
    }
}

impl Confine {
    /// No confinement at all.
    pub fn off() -> Self {
        Confine {
            sandbox: false,
            cgroup: None,
            memory_overhead: 0,
            user: None,
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
        let user = if root {
            match QemuUser::lookup() {
                Ok(u) => Some(u),
                Err(why) => {
                    tracing::warn!("QEMU runs as root: {why}");
                    None
                }
            }
        } else {
            None
        };
        Confine {
            sandbox: true,
            cgroup,
            memory_overhead: overhead_mib << 20,
            user,
        }
    }

    /// Whether QEMU's translation cache is capped (see [`TCG_TB_SIZE_MIB`]).
    pub fn caps_tcg_cache(&self) -> bool {
        self.cgroup.is_some()
    }
}

/// What ferry hands a QEMU that runs as [`QemuUser`]: descriptors it opened
/// (as root, where root may go) that the child keeps across exec, named to
/// QEMU as `/proc/self/fd/N` (files: no directory on the way is searched,
/// only the file's own mode counts) or `fd=N` (sockets, the tap).
#[derive(Default)]
pub struct Handed {
    /// Every descriptor the child keeps.
    fds: Vec<std::os::fd::OwnedFd>,
    /// Their numbers, for the child (no allocation there).
    raw: Vec<std::os::fd::RawFd>,
}

impl Handed {
    /// Opens `path` for QEMU: read-only, or read-write if `write`. The file
    /// gets `user`'s group, with group read (and write) permission added, so
    /// that QEMU's own `open` of `/proc/self/fd/N` passes.
    pub fn file(
        &mut self,
        path: &std::path::Path,
        write: bool,
        user: QemuUser,
    ) -> std::io::Result<String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        let meta = file.metadata()?;
        let want = if write { 0o060 } else { 0o040 };
        if meta.gid() != user.gid {
            std::os::unix::fs::fchown(&file, None, Some(user.gid))?;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & want != want {
            file.set_permissions(std::fs::Permissions::from_mode((mode | want) & 0o777))?;
        }
        Ok(format!("/proc/self/fd/{}", self.keep(file.into())))
    }

    /// Keeps `fd` open in the child; returns its number.
    pub fn keep(&mut self, fd: std::os::fd::OwnedFd) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        self.fds.push(fd);
        self.raw.push(raw);
        raw
    }

    /// The numbers to keep open across exec (see [`keep_open`]).
    pub fn raw(&self) -> &[std::os::fd::RawFd] {
        &self.raw
    }
}

/// Clears close-on-exec on `fds`. Runs in the child between fork and exec:
/// only `fcntl`.
pub fn keep_open(fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl on a descriptor number has no memory effects.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Becomes `user` with no supplementary group but the one of `/dev/kvm`.
/// Runs in the child between fork and exec: only `setgroups`, `setgid`,
/// `setuid`.
pub fn become_user(user: QemuUser) -> std::io::Result<()> {
    let groups: [libc::gid_t; 1] = [user.kvm_gid.unwrap_or(user.gid)];
    let count = usize::from(user.kvm_gid.is_some());
    // SAFETY: these calls take plain integers and a list of `count`
    // groups that lives on this stack frame.
    unsafe {
        if libc::setgroups(count, groups.as_ptr()) != 0
            || libc::setgid(user.gid) != 0
            || libc::setuid(user.uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
