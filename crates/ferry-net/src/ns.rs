//! Named network namespaces, compatible with `ip netns`: a namespace named
//! N is a bind mount of its nsfs file on `/run/netns/N`.
//!
//! The bind mount is made in the outermost mount namespace ferry can reach
//! (PID 1's, or else its outermost accessible ancestor's), not its own.
//! `ip netns exec` (how tests and users run ferry inside a "host"
//! namespace) gives its child a private, slave mount namespace: a mount made
//! there would be invisible to every other process, so a namespace created
//! by `ferry net up` could not be entered by a later `ferry run --netns`.
//! Mounting from PID 1's mount namespace propagates to all of them.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::NetError;

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

/// An open network namespace. Holding it keeps the namespace alive even if
/// its name is removed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    /// Opens the namespace named `name`, or `None` if there is none.
    pub fn open(name: &str) -> Result<Option<Netns>, NetError> {
        let path = path_of(name);
        match File::open(&path) {
            Ok(file) => {
                if !is_netns(&file) {
                    // A leftover file whose mount is gone (or was never
                    // visible here): not a namespace.
                    return Ok(None);
                }
                Ok(Some(Netns {
                    name: name.to_string(),
                    file,
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NetError::io(format!("opening {}", path.display()))(e)),
        }
    }

    /// Creates a new, empty namespace named `name`. Fails if one exists.
    pub fn create(name: &str) -> Result<Netns, NetError> {
        validate_name(name)?;
        std::fs::create_dir_all(NETNS_DIR)
            .map_err(NetError::io(format!("creating {NETNS_DIR}")))?;
        let path = path_of(name);
        if Netns::open(name)?.is_some() {
            return Err(NetError::BadOption(format!(
                "network namespace '{name}' already exists"
            )));
        }
        // A stale file without a mount (from a crash) is reused.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(NetError::io(format!("creating {}", path.display())))?;
        let target = cstring(&path);
        let dir = cstring(Path::new(NETNS_DIR));
        let root_mnt = outer_mount_ns();
        let root_fd = root_mnt.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let result = in_child(|| {
            // SAFETY: only raw system calls on pointers to CStrings made
            // before the fork.
            unsafe {
                if root_fd >= 0 {
                    // Ignored on failure: then ferry's own mount namespace
                    // is the best there is (e.g. inside a container).
                    libc::setns(root_fd, libc::CLONE_NEWNS);
                }
                let none = c"none".as_ptr();
                // Make the directory a shared mount point, as `ip netns` does,
                // so that mounts in it propagate.
                if libc::mount(
                    none,
                    dir.as_ptr(),
                    none,
                    libc::MS_SHARED | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    if libc::mount(
                        dir.as_ptr(),
                        dir.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                    {
                        return errno();
                    }
                    if libc::mount(
                        none,
                        dir.as_ptr(),
                        none,
                        libc::MS_SHARED | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                    {
                        return errno();
                    }
                }
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return errno();
                }
                if libc::mount(
                    c"/proc/self/ns/net".as_ptr(),
                    target.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return errno();
                }
                0
            }
        });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(NetError::NotRoot {
                    what: format!("create network namespace '{name}'"),
                    hint: String::new(),
                });
            }
            return Err(NetError::io(format!("creating network namespace '{name}'"))(e));
        }
        Netns::open(name)?.ok_or_else(|| NetError::Io {
            what: format!("opening the new network namespace '{name}'"),
            source: std::io::Error::other("its mount is not visible from ferry's mount namespace"),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under [`NETNS_DIR`].
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// The open nsfs file, e.g. for `setns` in a child process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Moves the calling thread into this namespace. Sockets the thread
    /// creates afterwards belong to it.
    pub fn enter(&self) -> Result<(), NetError> {
        enter_fd(&self.file, &self.name)
    }

    /// Runs `f` on a new thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// The calling thread's current network namespace, to return to later.
pub fn current() -> Result<File, NetError> {
    File::open("/proc/thread-self/ns/net")
        .map_err(NetError::io("opening this thread's network namespace"))
}

/// Moves the calling thread into the namespace `file` refers to.
pub fn enter_fd(file: &File, name: &str) -> Result<(), NetError> {
    // SAFETY: setns on a valid, open descriptor; it only affects this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(
            NetError::io(format!("entering network namespace '{name}'"))(
                std::io::Error::last_os_error(),
            ),
        );
    }
    Ok(())
}

/// Whether a namespace named `name` exists.
pub fn exists(name: &str) -> bool {
    matches!(Netns::open(name), Ok(Some(_)))
}

/// The names of all namespaces under [`NETNS_DIR`].
pub fn list() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    names
}

/// Removes the name `name` (the namespace itself goes once nothing uses it:
/// its interfaces go with it, and a veth's host end with its peer).
pub fn remove(name: &str) -> Result<(), NetError> {
    validate_name(name)?;
    let path = path_of(name);
    let target = cstring(&path);
    let root_mnt = outer_mount_ns();
    let root_fd = root_mnt.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let _ = in_child(|| {
        // SAFETY: raw system calls on a CString made before the fork.
        unsafe {
            if root_fd >= 0 {
                libc::setns(root_fd, libc::CLONE_NEWNS);
            }
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
        0
    });
    // And in ferry's own mount namespace, in case the mount was made there.
    // SAFETY: umount2 on a valid C string; failure (not mounted) is fine.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io(format!("removing {}", path.display()))(e)),
    }
}

/// The mount namespace to make namespace mounts in, so that every process
/// sees them: PID 1's if it is readable. Otherwise (PID 1 may be off limits
/// in containers and sandboxes), if ferry's `/run/netns` is a slave of a
/// peer group (`ip netns exec` makes it one), a process's namespace where
/// that peer group is shared, not slave; failing that, the highest ancestor's
/// that is readable.
fn outer_mount_ns() -> Option<File> {
    if let Ok(f) = File::open("/proc/1/ns/mnt") {
        return Some(f);
    }
    let ours = netns_mount_tags("self");
    if let Some((_, Some(master))) = ours {
        let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        for entry in pids {
            let pid = entry.file_name();
            let Some(pid) = pid
                .to_str()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if netns_mount_tags(pid) == Some((Some(master), None)) {
                if let Ok(f) = File::open(format!("/proc/{pid}/ns/mnt")) {
                    return Some(f);
                }
            }
        }
    }
    let mut best = None;
    // SAFETY: getppid has no preconditions.
    let mut pid = unsafe { libc::getppid() } as u32;
    for _ in 0..64 {
        if pid <= 1 {
            break;
        }
        if let Ok(f) = File::open(format!("/proc/{pid}/ns/mnt")) {
            best = Some(f);
        }
        pid = match parent_of(pid) {
            Some(p) => p,
            None => break,
        };
    }
    best
}

/// The `shared:N` and `master:N` peer groups of the `/run/netns` mount in
/// process `pid`'s mount namespace, if it is a mount point there.
fn netns_mount_tags(pid: &str) -> Option<(Option<u32>, Option<u32>)> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(NETNS_DIR))?;
    let optional = line.split(' ').skip(6).take_while(|f| *f != "-");
    let (mut shared, mut master) = (None, None);
    for field in optional {
        if let Some(n) = field.strip_prefix("shared:") {
            shared = n.parse().ok();
        } else if let Some(n) = field.strip_prefix("master:") {
            master = n.parse().ok();
        }
    }
    Some((shared, master))
}

/// A process's parent, from `/proc/PID/stat` (the field after the
/// parenthesised command name, which may itself hold spaces).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Namespace names become file names and iptables comments.
pub fn validate_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(NetError::BadOption(format!(
            "invalid network namespace name '{name}': use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.'"
        )))
    }
}

fn is_netns(file: &File) -> bool {
    // NSFS_MAGIC: the file is a namespace, not the empty mount point.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // SAFETY: fstatfs fills a zeroed statfs from a valid descriptor.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC
    }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL")
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs `f` in a forked child (so that it may change its mount namespace,
/// which a multi-threaded process cannot) and returns its errno as an error.
/// `f` must only make async-signal-safe calls.
fn in_child(f: impl FnOnce() -> i32) -> Result<(), std::io::Error> {
    // SAFETY: the child only runs `f` (raw system calls, by contract) and
    // `_exit`s; the parent waits for it.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            libc::_exit(f());
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(())
        } else if libc::WIFEXITED(status) {
            Err(std::io::Error::from_raw_os_error(libc::WEXITSTATUS(status)))
        } else {
            Err(std::io::Error::other("the helper process died"))
        }
    }
}
