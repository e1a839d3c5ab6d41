//! Every running VM has a name and a directory `$FERRY_STATE/vms/<name>/`
//! holding its pid, engine sockets, console log and control socket.
//!
//! The VM's supervisor holds an exclusive `flock` on `<dir>/lock` for as long
//! as it runs. That lock, not the pid file, says whether the name is in use:
//! a lock dies with its process, so a crash never leaves a name taken, and a
//! recycled pid can never make a dead VM look alive.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{FileError, NameError};
use crate::record::{RecordState, VmRecord};
use crate::Paths;

/// Largest console log before it is rotated to `console.log.1`.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

/// A VM's state directory, locked by this process.
#[derive(Debug)]
pub struct VmDir {
    name: String,
    path: PathBuf,
    _lock: File,
}

impl VmDir {
    /// Claims `name`: creates (or takes over a stale) state directory and
    /// locks it. Fails if a running VM holds the name, or a suspended or
    /// stopped VM whose state the directory keeps.
    pub fn create(paths: &Paths, name: &str) -> Result<Self, NameError> {
        Self::claim(paths, name, false)
    }

    /// Claims the directory of the suspended (or stopped, or crashed) VM
    /// `name` to run it again: like [`VmDir::create`], but keeps what
    /// [`KEPT`] names (its record, saved package and logs).
    pub fn resume(paths: &Paths, name: &str) -> Result<Self, NameError> {
        Self::claim(paths, name, true)
    }

    fn claim(paths: &Paths, name: &str, resume: bool) -> Result<Self, NameError> {
        validate_name(name)?;
        let vms = paths.vms();
        crate::paths::private_dir(&paths.state).map_err(FileError::at(&paths.state))?;
        crate::paths::private_dir(&vms).map_err(FileError::at(&vms))?;
        let path = vms.join(name);
        let fresh = {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(FileError::at(&path)(e).into()),
            }
        };
        // One made by an older ferry: for its owner only, too.
        crate::paths::private_dir(&path).map_err(FileError::at(&path))?;
        let lock_path = path.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(FileError::at(&lock_path))?;
        // Others test the lock with a brief shared lock (`running_vm_dir`,
        // the fleet watchers): a conflict that short is not a running VM.
        let mut locked = try_lock(&lock, libc::LOCK_EX);
        for _ in 0..20 {
            if locked {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            locked = try_lock(&lock, libc::LOCK_EX);
        }
        if !locked {
            let pid = std::fs::read_to_string(path.join("pid"))
                .map(|p| format!(" (pid {})", p.trim()))
                .unwrap_or_default();
            return Err(NameError::NameInUse {
                name: name.to_string(),
                pid,
            });
        }
        if !fresh && !resume {
            if let Some(state) = held_state(&path) {
                return Err(NameError::NameHeld {
                    name: name.to_string(),
                    state,
                });
            }
        }
        if !fresh {
            tracing::info!(
                name,
                "taking over the stale state directory of a VM that is gone"
            );
            remove_leftover_network(&path);
            clear(&path, if resume { KEPT } else { &["lock"] })?;
        }
        let dir = VmDir {
            name: name.to_string(),
            path,
            _lock: lock,
        };
        dir.write_file("pid", &format!("{}\n", std::process::id()))?;
        Ok(dir)
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a small file in the directory atomically (temp + rename).
    pub fn write_file(&self, file: &str, contents: &str) -> Result<(), FileError> {
        let tmp = self.path.join(format!(".{file}.tmp"));
        let dest = self.path.join(file);
        std::fs::write(&tmp, contents).map_err(FileError::at(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(FileError::at(&dest))
    }

    /// Removes the directory and everything in it, state or not (`ferry
    /// rm`, `ferry clean`).
    pub fn remove_all(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the VM's state directory");
        }
    }

    /// Removes the directory; the lock goes with it. A directory that holds
    /// a VM's state (a saved package, or the record of a VM that is
    /// suspended, stopped or crashed) keeps what [`KEPT`] names: no path
    /// that drops a VM deletes a user's data, only `ferry rm`, `ferry stop
    /// --discard` and `ferry clean` do, on purpose.
    pub fn remove(self) {
        let result = if holds_state(&self.path) {
            clear(&self.path, KEPT)
        } else {
            std::fs::remove_dir_all(&self.path).map_err(FileError::at(&self.path))
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the VM's state directory");
        }
    }
}

/// What a directory whose VM is not running keeps of it: the lock (so the
/// name can be claimed again), its record, its saved package and its logs,
/// with the guest's errors (a crashed VM's last error is what `ps --json`
/// and `ferry watch` tell about it).
pub const KEPT: &[&str] = &[
    "lock",
    files::RECORD,
    files::SAVED,
    files::CONSOLE,
    files::CONSOLE_OLD,
    files::SUPERVISOR_LOG,
    crate::guest_errors::ERRORS_FILE,
];

/// Removes everything in `dir` but the files named in `keep`.
fn clear(dir: &Path, keep: &[&str]) -> Result<(), FileError> {
    for entry in std::fs::read_dir(dir)
        .map_err(FileError::at(dir))?
        .flatten()
    {
        if keep.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        let p = entry.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
    Ok(())
}

/// Whether a directory holds state that outlives its VM's process.
fn holds_state(dir: &Path) -> bool {
    dir.join(files::SAVED).exists()
        || VmRecord::load(dir).is_some_and(|r| r.state != RecordState::Running)
}

/// If the (unlocked) directory belongs to a VM that keeps its name while
/// it is not running, that VM's state: a suspended or stopped VM, or one
/// with a saved package (which `ferry start` can resume). A crashed VM
/// without one holds no name: whoever claims it takes the directory over.
pub fn held_state(dir: &Path) -> Option<RecordState> {
    let record = VmRecord::load(dir);
    match record.as_ref().map(|r| r.state) {
        Some(s @ (RecordState::Suspended | RecordState::Stopped)) => Some(s),
        _ if dir.join(files::SAVED).exists() => Some(RecordState::Suspended),
        _ if record.as_ref().is_some_and(VmRecord::resumable) => Some(RecordState::Suspended),
        _ => None,
    }
}

/// A VM whose supervisor was killed leaves the namespace ferry made for
/// it; whoever takes its directory over (or `ferry clean`) removes it.
pub fn remove_leftover_network(dir: &Path) {
    let Ok(bytes) = std::fs::read(dir.join(files::NET)) else {
        return;
    };
    let Ok(info) = serde_json::from_slice::<crate::vm::NetInfo>(&bytes) else {
        return;
    };
    if info.created_netns {
        match ferry_net::vmnet::remove_leftover_namespace(&info.netns) {
            Ok(true) => tracing::info!(netns = %info.netns, "removed a dead VM's namespace"),
            Ok(false) => {}
            Err(e) => tracing::warn!(netns = %info.netns, "removing a dead VM's namespace: {e}"),
        }
    }
}

/// Files inside a VM directory, named once here.
pub mod files {
    /// The control socket.
    pub const CONTROL: &str = "control.sock";
    /// The shell socket (`ferry shell` clients; see `crate::shell`).
    pub const SHELL: &str = "shell.sock";
    /// The console log.
    pub const CONSOLE: &str = "console.log";
    /// The console log before its last rotation.
    pub const CONSOLE_OLD: &str = "console.log.1";
    /// A detached VM's record ([`crate::record::VmRecord`]).
    pub const RECORD: &str = "vm.json";
    /// The package a suspended clone is saved in.
    pub const SAVED: &str = "saved.ferry";
    /// What a detached VM's supervisor (ferry itself) logs.
    pub const SUPERVISOR_LOG: &str = "supervisor.log";
    /// Guest RAM.
    pub const MEMORY: &str = "memory";
    /// The disk overlay.
    pub const DISK: &str = "disk.qcow2";
    /// The raw disk of a VM received by live migration.
    pub const RECEIVED_DISK: &str = "disk-received.raw";
    /// The VM's network namespace and exposures (JSON), for other VMs'
    /// gateways and for cleaning up after a crash.
    pub const NET: &str = "net.json";
}

/// The state directory of a running VM named `name`, for clients.
pub fn running_vm_dir(paths: &Paths, name: &str) -> Result<PathBuf, NameError> {
    let path = paths.vms().join(name);
    let running = validate_name(name).is_ok()
        && File::open(path.join("lock"))
            .map(|f| !try_lock(&f, libc::LOCK_SH))
            .unwrap_or(false);
    if running {
        Ok(path)
    } else {
        Err(NameError::NoSuchVm {
            name: name.to_string(),
            dir: paths.vms(),
        })
    }
}

fn try_lock(file: &File, op: libc::c_int) -> bool {
    // SAFETY: flock on a file descriptor owned by `file`, which outlives the
    // call; LOCK_NB makes it return at once.
    unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

/// Checks a VM name: it becomes a directory name and, later, part of
/// network namespace and interface names.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadName(name.to_string()))
    }
}

/// A generated name: the recipe's name and four random hex digits.
pub fn generate_name(prefix: &str) -> String {
    let suffix: u16 = rand::random();
    format!("{prefix}-{suffix:04x}")
}

/// The console log: appended to, rotated to `console.log.1` at
/// [`CONSOLE_LOG_CAP`], so a chatty guest cannot fill the disk.
pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
    tail: Vec<u8>,
}

impl ConsoleLog {
    /// Opens (creating) the log at `path`.
    pub fn open(path: &Path, cap: u64) -> Result<Self, FileError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(FileError::at(path))?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            written,
            cap,
            tail: Vec::new(),
        })
    }

    /// Appends guest output.
    pub fn write(&mut self, data: &[u8]) {
        if self.written + data.len() as u64 > self.cap {
            let rotated = self.path.with_extension("log.1");
            let _ = std::fs::rename(&self.path, &rotated);
            if let Ok(f) = File::options().create(true).append(true).open(&self.path) {
                self.file = f;
                self.written = 0;
            }
        }
        if self.file.write_all(data).is_ok() {
            self.written += data.len() as u64;
        }
        self.tail.extend_from_slice(data);
        if self.tail.len() > 8192 {
            self.tail.drain(..self.tail.len() - 8192);
        }
    }

    /// The last `n` non-empty lines written, for error messages.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        last_lines(&self.tail, n)
    }
}

/// The last `n` non-empty lines of `bytes`, without control characters.
pub fn last_lines(bytes: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Where detached peers' logs are: outside their VM directories, so that
/// why a peer ended (it may have moved its VM on) can still be read.
pub fn peer_logs_dir(paths: &Paths) -> PathBuf {
    paths.state.join("logs")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> Paths {
        Paths {
            state: dir.to_path_buf(),
            cache: dir.join("cache"),
            net_prefix: "ferry".into(),
        }
    }

    #[test]
    fn a_name_is_held_while_its_dir_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let p = paths(tmp.path());
        let first = VmDir::create(&p, "web-1").unwrap();
        assert!(running_vm_dir(&p, "web-1").is_ok());
        // flock is per open file description, so a second open conflicts even
        // within one process, as it would between two ferry processes.
        let e = VmDir::create(&p, "web-1").unwrap_err().to_string();
        assert!(e.contains("in use by a running VM"), "{e}");
        drop(first);
        // The directory is stale now: it can be taken over.
        assert!(running_vm_dir(&p, "web-1").is_err());
        let again = VmDir::create(&p, "web-1").unwrap();
        again.remove();
        assert!(!tmp.path().join("vms/web-1").exists());
    }

    /// State directories are 0700, even ones an older ferry made 0755;
    /// copies of memory and disk are 0600. Checked to fail without the
    /// defence (plain `create_dir_all`/`File::create`: 0755 and 0644 here).
    #[test]
    fn state_directories_and_memory_files_are_private() {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let p = paths(&state);
        // An old VM directory, made open to all.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(state.join("vms/old"))
            .unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = VmDir::create(&p, "web-1").unwrap();
        let old = VmDir::create(&p, "old").unwrap();
        for d in [state.clone(), p.vms(), dir.path().into(), old.path().into()] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        let memory = dir.path().join(files::MEMORY);
        crate::paths::private_file(&memory).unwrap();
        assert_eq!(mode(&memory), 0o600);
        let src = tmp.path().join("src");
        std::fs::write(&src, b"ram").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
        let copy = dir.path().join("copy");
        crate::start::package::copy_sparse(&src, &copy).unwrap();
        assert_eq!(mode(&copy), 0o600);
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "-x", "a/b", "UPPER", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_name("redis-1.a_b").unwrap();
        validate_name(&generate_name("tiny")).unwrap();
    }

    #[test]
    fn console_log_rotates() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.log");
        let mut log = ConsoleLog::open(&path, 100).unwrap();
        for i in 0..30 {
            log.write(format!("line {i}\n").as_bytes());
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(tmp.path().join("console.log.1").exists());
        assert_eq!(log.last_lines(2), vec!["line 28", "line 29"]);
    }
}
