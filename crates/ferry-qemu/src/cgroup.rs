//! A cgroup per QEMU process, made as a child of the cgroup ferry itself
//! runs in (never elsewhere in the hierarchy: ferry may itself be confined
//! by whoever started it, and its VMs stay inside that), with a memory and
//! a pids limit. cgroup v1 (one hierarchy per controller, e.g.
//! `/sys/fs/cgroup/memory`) and v2 (one unified hierarchy) are both read
//! from `/proc/self/cgroup` and `/proc/self/mountinfo`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where ferry's own cgroups are, per controller ferry limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupParent {
    /// cgroup v2: ferry's cgroup in the unified hierarchy, with the memory
    /// and pids controllers available to its children.
    V2(PathBuf),
    /// cgroup v1: ferry's cgroup in the memory hierarchy, and in the pids
    /// hierarchy if there is one.
    V1 {
        /// e.g. `/sys/fs/cgroup/memory/<ferry's path>`.
        memory: PathBuf,
        /// e.g. `/sys/fs/cgroup/pids/<ferry's path>`.
        pids: Option<PathBuf>,
    },
}

impl CgroupParent {
    /// The directory (the memory controller's, on v1), for messages.
    pub fn display(&self) -> std::path::Display<'_> {
        match self {
            CgroupParent::V2(p) => p.display(),
            CgroupParent::V1 { memory, .. } => memory.display(),
        }
    }

    /// ferry's own cgroup, where a memory controller is mounted; `None`
    /// (with the reason) where there is none ferry may use.
    pub fn of_self() -> Result<Self, String> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        parent_from(&cgroups, &mountinfo)
    }

    /// Removes the empty cgroups that ferry processes now gone left here.
    ///
    /// A VM's cgroup is removed by the process that made it, once its QEMU
    /// is reaped ([`VmCgroup`]'s drop). A supervisor killed outright (a
    /// `SIGKILL`, the OOM killer, a crash) never gets there: its QEMU dies
    /// with it, and the empty directory stayed, one per killed VM, for as
    /// long as the host ran (and its parent could not be removed). So each
    /// new VM's cgroup first sweeps its siblings: a directory named as
    /// ferry names them (`ferry-<vm>-<pid>-<serial>`) whose `<pid>` no
    /// longer runs is removed. The kernel refuses to remove a cgroup that
    /// still holds a process, so a live VM's is never touched, whatever its
    /// name says. Returns how many were removed.
    pub fn remove_stale(&self) -> usize {
        match self {
            CgroupParent::V2(dir) => remove_stale_in(dir),
            CgroupParent::V1 { memory, pids } => {
                remove_stale_in(memory) + pids.as_deref().map_or(0, remove_stale_in)
            }
        }
    }
}

/// [`CgroupParent::remove_stale`] in one directory.
fn remove_stale_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(maker_pid) else {
            continue;
        };
        // This process's own, and every live ferry's, stay.
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        // Fails (EBUSY) while a process is in it, or it has children.
        if std::fs::remove_dir(entry.path()).is_ok() {
            tracing::info!(cgroup = %entry.path().display(), pid, "removed the cgroup of a ferry process that is gone");
            removed += 1;
        }
    }
    removed
}

/// The pid of the ferry process that made cgroup `name`, if the name is
/// one ferry gives (`ferry-<vm>-<pid>-<serial>`, see [`VmCgroup::create`]).
fn maker_pid(name: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let rest = name.strip_prefix("ferry-")?;
    let (rest, serial) = rest.rsplit_once('-')?;
    let (vm, pid) = rest.rsplit_once('-')?;
    (!vm.is_empty() && digits(serial) && digits(pid))
        .then(|| pid.parse().ok())
        .flatten()
}

/// One mount of a cgroup hierarchy: its root inside the hierarchy, where
/// it is mounted, and its controllers (`None`: v2).
struct Mount {
    root: String,
    point: PathBuf,
    controllers: Option<Vec<String>>,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next()?;
            let options = after.next().unwrap_or("");
            let root = fields.get(3)?.to_string();
            let point = PathBuf::from(unescape(fields.get(4)?));
            match fstype {
                "cgroup2" => Some(Mount {
                    root,
                    point,
                    controllers: None,
                }),
                "cgroup" => Some(Mount {
                    root,
                    point,
                    controllers: Some(options.split(',').map(String::from).collect()),
                }),
                _ => None,
            }
        })
        .collect()
}

/// mountinfo escapes spaces and a few others as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(b as char);
                continue;
            }
            out.push(c);
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// The directory of cgroup `path` (from /proc/self/cgroup) in `mount`.
fn in_mount(mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str())?
    };
    Some(mount.point.join(rel.trim_start_matches('/')))
}

fn parent_from(cgroups: &str, mountinfo: &str) -> Result<CgroupParent, String> {
    let mounts = mounts(mountinfo);
    let mut v2_path = None;
    let mut v1: Vec<(Vec<&str>, &str)> = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2_path = Some(path);
        } else {
            v1.push((controllers.split(',').collect(), path));
        }
    }
    let v1_dir = |controller: &str| -> Option<PathBuf> {
        let (_, path) = v1.iter().find(|(c, _)| c.contains(&controller))?;
        let mount = mounts.iter().find(|m| {
            m.controllers
                .as_ref()
                .is_some_and(|c| c.iter().any(|o| o == controller))
        })?;
        in_mount(mount, path)
    };
    if let Some(memory) = v1_dir("memory") {
        return Ok(CgroupParent::V1 {
            memory,
            pids: v1_dir("pids"),
        });
    }
    if let Some(path) = v2_path {
        if let Some(mount) = mounts.iter().find(|m| m.controllers.is_none()) {
            if let Some(dir) = in_mount(mount, path) {
                let root_controllers =
                    std::fs::read_to_string(mount.point.join("cgroup.controllers"))
                        .unwrap_or_default();
                if root_controllers.split_whitespace().any(|c| c == "memory") {
                    return Ok(CgroupParent::V2(dir));
                }
            }
        }
    }
    Err("no cgroup memory controller is mounted (neither v1 nor v2)".into())
}

/// The cgroup(s) of one QEMU process. Removed when dropped (after QEMU is
/// gone: a cgroup with a process in it cannot be removed).
#[derive(Debug)]
pub struct VmCgroup {
    /// The directories made, the one shown first.
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, opened when the cgroup is made: ferry
    /// writes QEMU's pid there ([`VmCgroup::admit`]).
    procs: Vec<File>,
    v2: bool,
    memory_limit: u64,
    overhead: u64,
    disk_on_tmpfs: u64,
}

/// Makes each VM's cgroup name unique within this ferry process.
static SERIAL: AtomicU64 = AtomicU64::new(0);

impl VmCgroup {
    /// Makes the cgroup for VM `name` under `parent` with these limits.
    pub fn create(
        parent: &CgroupParent,
        name: &str,
        memory_limit: u64,
        overhead: u64,
        disk_on_tmpfs: u64,
        pids_limit: u64,
    ) -> std::io::Result<Self> {
        parent.remove_stale();
        let leaf = format!(
            "ferry-{}-{}-{}",
            sanitize(name),
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let mut cg = VmCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            v2: matches!(parent, CgroupParent::V2(_)),
            memory_limit,
            overhead,
            disk_on_tmpfs,
        };
        match parent {
            CgroupParent::V2(dir) => {
                // The controllers must be enabled for ferry's children (the
                // kernel refuses while ferry's own cgroup holds processes,
                // unless it is the root).
                let enabled =
                    std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
                let has = |c: &str| enabled.split_whitespace().any(|e| e == c);
                if !(has("memory") && has("pids")) {
                    std::fs::write(dir.join("cgroup.subtree_control"), "+memory +pids").map_err(
                        |e| {
                            std::io::Error::new(
                                e.kind(),
                                format!(
                                    "cannot give ferry's children the memory and pids \
                                     controllers ({e}): run ferry in a delegated cgroup of its own"
                                ),
                            )
                        },
                    )?;
                }
                let d = dir.join(&leaf);
                std::fs::create_dir(&d)?;
                cg.dirs.push(d.clone());
                write(&d.join("memory.max"), memory_limit)?;
                // No swap for guest memory: the limit means RAM.
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), pids_limit)?;
            }
            CgroupParent::V1 { memory, pids } => {
                let d = memory.join(&leaf);
                std::fs::create_dir(&d)?;
                cg.dirs.push(d.clone());
                write(&d.join("memory.limit_in_bytes"), memory_limit)?;
                if let Some(pids) = pids {
                    let p = pids.join(&leaf);
                    std::fs::create_dir(&p)?;
                    cg.dirs.push(p.clone());
                    write(&p.join("pids.max"), pids_limit)?;
                }
            }
        }
        for d in &cg.dirs {
            cg.procs.push(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))?,
            );
        }
        Ok(cg)
    }

    /// The cgroup's directory (the memory controller's, on v1).
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }

    /// The memory limit in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// The part of the limit that is for QEMU itself, not guest RAM.
    pub fn overhead(&self) -> u64 {
        self.overhead
    }

    /// The part of the limit that is for the VM's disk, when QEMU writes
    /// it on tmpfs (whose pages count against the writer's cgroup).
    pub fn disk_on_tmpfs(&self) -> u64 {
        self.disk_on_tmpfs
    }

    /// Moves process `pid`, with all its threads, into the cgroup (each
    /// hierarchy's, on v1).
    pub fn admit(&self, pid: u32) -> std::io::Result<()> {
        let pid = pid.to_string();
        for mut procs in &self.procs {
            procs.write_all(pid.as_bytes())?;
        }
        Ok(())
    }

    /// How many processes the kernel killed in this cgroup for being over
    /// its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok()).flatten()
                })
            })
            .unwrap_or(0)
    }

    /// The most memory the cgroup used, when the kernel keeps it (v1, and
    /// v2 since Linux 5.19).
    pub fn peak_memory(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        for d in self.dirs.iter().rev() {
            // The last threads of a reaped process may take a moment to
            // leave.
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
            if d.exists() {
                tracing::warn!(cgroup = %d.display(), "could not remove the VM's cgroup");
            }
        }
    }
}

fn write(path: &Path, value: u64) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.to_string().as_bytes())
}

/// A VM name as a cgroup directory name: no `/`, nothing odd.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ferrys_own_names_give_a_maker() {
        assert_eq!(maker_pid("ferry-web-12-4157-0"), Some(4157));
        assert_eq!(maker_pid("ferry-t-wb-4157-12"), Some(4157));
        assert_eq!(maker_pid("ferry-4157-0"), None);
        assert_eq!(maker_pid("ferry-x-+41-0"), None);
        assert_eq!(maker_pid("ferry-x-41-"), None);
        assert_eq!(maker_pid("system.slice"), None);
        assert_eq!(maker_pid("other-x-41-0"), None);
    }

    #[test]
    fn the_sweep_removes_only_what_dead_processes_left_empty() {
        let dir = tempfile::tempdir().unwrap();
        // A pid that ran and is gone (reaped): a killed supervisor's.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let stale = dir.path().join(format!("ferry-a-{dead}-0"));
        let busy = dir.path().join(format!("ferry-b-{dead}-1"));
        let mine = dir.path().join(format!("ferry-c-{me}-0"));
        let foreign = dir.path().join("user.slice");
        for d in [&stale, &busy, &mine, &foreign] {
            std::fs::create_dir(d).unwrap();
        }
        // Stands for a cgroup that still holds a process: not empty.
        std::fs::write(busy.join("cgroup.procs"), "1\n").unwrap();
        assert_eq!(remove_stale_in(dir.path()), 1);
        assert!(!stale.exists());
        assert!(busy.exists() && mine.exists() && foreign.exists());
    }

    #[test]
    fn v1_memory_and_pids_below_ferrys_own_cgroups() {
        let cgroups = "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/x\n0::/\n";
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            40 31 0:37 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
            42 31 0:39 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parent_from(cgroups, mountinfo).unwrap(),
            CgroupParent::V1 {
                memory: "/sys/fs/cgroup/memory/process_api/x".into(),
                pids: Some("/sys/fs/cgroup/pids/a".into()),
            }
        );
    }

    #[test]
    fn a_mount_of_a_subtree_is_followed() {
        // A container that sees only its own part of the hierarchy.
        let cgroups = "4:memory:/outer/inner\n";
        let mountinfo = "35 31 0:32 /outer /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            parent_from(cgroups, mountinfo).unwrap(),
            CgroupParent::V1 {
                memory: "/sys/fs/cgroup/memory/inner".into(),
                pids: None,
            }
        );
    }

    #[test]
    fn no_memory_controller_is_an_error() {
        let cgroups = "8:pids:/\n";
        let mountinfo = "40 31 0:37 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        assert!(parent_from(cgroups, mountinfo).is_err());
    }
}
