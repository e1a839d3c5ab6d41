//! Errors in a running guest, as its owner sees them: the service exited,
//! a kernel oops or panic, the OOM killer (`docs/shell.md`, *ferry watch*).
//!
//! The owner appends each to `<vm dir>/errors.jsonl` (one JSON object a
//! line) and to the console log as a `[ferry] error: ...` line, and sends
//! it into the VM's channel, where the owner turns it into
//! [`crate::Event::GuestError`]. `ferry watch` follows the files;
//! `ps --json` shows the last one.

use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vmdir::ConsoleLog;

/// The file in a VM directory.
pub const ERRORS_FILE: &str = "errors.jsonl";

/// The file is cut (to nothing) past this size: errors are for watching,
/// not a history.
const ERRORS_CAP: u64 = 1 << 20;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestErrorKind {
    /// The service exited (or never started).
    ServiceExited,
    /// The service, live before, failed its liveness check (3 times in a
    /// row, 2 s apart); it still runs.
    LivenessFailed,
    /// A kernel oops or BUG.
    KernelOops,
    /// A kernel panic.
    KernelPanic,
    /// The OOM killer killed a process.
    Oom,
}

/// One error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestError {
    /// When the owner saw it (ms since the Unix epoch).
    pub unix_ms: u64,
    /// What kind.
    pub kind: GuestErrorKind,
    /// One line: what happened.
    pub what: String,
}

impl GuestError {
    /// An error seen now.
    pub fn now(kind: GuestErrorKind, what: impl Into<String>) -> Self {
        Self {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            kind,
            what: what.into(),
        }
    }
}

/// The kind of error a console line reports, and the line.
pub fn classify_console_line(line: &str) -> Option<GuestErrorKind> {
    if line.contains("Kernel panic") {
        Some(GuestErrorKind::KernelPanic)
    } else if line.contains("Out of memory: Killed process")
        || line.contains("Memory cgroup out of memory: Killed process")
    {
        Some(GuestErrorKind::Oom)
    } else if line.contains("Oops:")
        || line.contains("BUG: ")
        || line.contains("general protection fault")
    {
        Some(GuestErrorKind::KernelOops)
    } else {
        None
    }
}

/// Cuts console output into lines and finds the errors in them.
#[derive(Default)]
pub struct ConsoleScanner {
    partial: Vec<u8>,
}

impl ConsoleScanner {
    /// Adds console bytes; returns the errors of the lines now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<GuestError> {
        self.partial.extend_from_slice(bytes);
        let mut found = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if let Some(kind) = classify_console_line(line) {
                // Drop the kernel's timestamp, keep the message.
                let message = match line.split_once("] ") {
                    Some((stamp, rest)) if stamp.trim_start().starts_with('[') => rest,
                    _ => line,
                };
                found.push(GuestError::now(kind, format!("kernel: {}", message.trim())));
            }
        }
        // A console that never ends its line must not grow this for ever.
        if self.partial.len() > 64 * 1024 {
            self.partial.clear();
        }
        found
    }
}

/// Where a VM's errors go.
#[derive(Clone)]
pub struct ErrorLog {
    path: PathBuf,
    console: Arc<Mutex<ConsoleLog>>,
}

impl ErrorLog {
    /// The log of the VM in `dir`, whose console log is `console`.
    pub fn new(dir: &Path, console: Arc<Mutex<ConsoleLog>>) -> Self {
        Self {
            path: dir.join(ERRORS_FILE),
            console,
        }
    }

    /// Records `e` in the errors file and the console log.
    pub fn record(&self, e: &GuestError) {
        tracing::debug!(kind = ?e.kind, "guest error: {}", e.what);
        if let Ok(mut console) = self.console.lock() {
            console.write(format!("\n[ferry] error: {}\n", e.what).as_bytes());
        }
        let too_big = std::fs::metadata(&self.path).is_ok_and(|m| m.len() > ERRORS_CAP);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path);
        if let Ok(mut f) = file {
            if too_big {
                let _ = f.set_len(0);
            }
            let mut line = serde_json::to_vec(e).expect("json");
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
    }
}

/// The errors recorded in the VM directory `dir`, oldest first.
pub fn read_errors(dir: &Path) -> Vec<GuestError> {
    let Ok(f) = std::fs::File::open(dir.join(ERRORS_FILE)) else {
        return Vec::new();
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// The last error recorded in `dir`.
pub fn last_error(dir: &Path) -> Option<GuestError> {
    read_errors(dir).pop()
}

/// Follows one errors file from a position: what was added since.
#[derive(Debug)]
pub struct ErrorsTail {
    path: PathBuf,
    offset: u64,
}

impl ErrorsTail {
    /// Follows `dir`'s errors from now on (`from_start`: from the first).
    pub fn new(dir: &Path, from_start: bool) -> Self {
        let path = dir.join(ERRORS_FILE);
        let offset = if from_start {
            0
        } else {
            std::fs::metadata(&path).map_or(0, |m| m.len())
        };
        Self { path, offset }
    }

    /// The errors added since the last call.
    pub fn poll(&mut self) -> Vec<GuestError> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            self.offset = 0;
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Cut (or a new VM of the same name): start over.
            self.offset = 0;
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut found = Vec::new();
        let mut reader = std::io::BufReader::new(f);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line still being written: read it whole next time.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(n) => {
                    self.offset += n as u64;
                    if let Ok(e) = serde_json::from_str(line.trim_end()) {
                        found.push(e);
                    }
                }
            }
        }
        found
    }
}

/// Which VMs `ferry watch` follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchSet {
    /// Every VM of the state directory, also those started later.
    All,
    /// These.
    Names(Vec<String>),
}

/// `ferry watch`: follows the errors of a set of VMs. Errors recorded
/// before the watch began are not reported, except for VMs that appear
/// (with `All`) after it began.
pub struct Watch {
    paths: crate::Paths,
    set: WatchSet,
    tails: std::collections::BTreeMap<String, ErrorsTail>,
}

impl Watch {
    /// Starts watching.
    ///
    /// # Errors
    /// A named VM does not exist (running, suspended or stopped).
    pub fn new(paths: &crate::Paths, set: WatchSet) -> Result<Self, crate::NameError> {
        let mut tails = std::collections::BTreeMap::new();
        let names = match &set {
            WatchSet::Names(names) => {
                for name in names {
                    crate::vmdir::validate_name(name)?;
                    if crate::fleet::state_of(paths, name).is_none() {
                        return Err(crate::NameError::UnknownVm {
                            name: name.clone(),
                            dir: paths.vms(),
                        });
                    }
                }
                names.clone()
            }
            WatchSet::All => Self::all_names(paths),
        };
        for name in names {
            let tail = ErrorsTail::new(&paths.vms().join(&name), false);
            tails.insert(name, tail);
        }
        Ok(Self {
            paths: paths.clone(),
            set,
            tails,
        })
    }

    /// Every VM directory's name (cheap: no supervisor is asked).
    fn all_names(paths: &crate::Paths) -> Vec<String> {
        std::fs::read_dir(paths.vms())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("lock").exists())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| crate::vmdir::validate_name(n).is_ok())
            .collect()
    }

    /// The errors recorded since the last call, with their VM's name.
    pub fn poll(&mut self) -> Vec<(String, GuestError)> {
        if self.set == WatchSet::All {
            for name in Self::all_names(&self.paths) {
                let dir = self.paths.vms().join(&name);
                self.tails
                    .entry(name)
                    .or_insert_with(|| ErrorsTail::new(&dir, true));
            }
        }
        let mut found = Vec::new();
        for (name, tail) in &mut self.tails {
            found.extend(tail.poll().into_iter().map(|e| (name.clone(), e)));
        }
        found.sort_by_key(|(_, e)| e.unix_ms);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kernel_errors_in_console_lines() {
        let mut s = ConsoleScanner::default();
        let found = s.push(
            b"[    1.0] ok\n[   12.5] Out of memory: Killed process 211 (ferry-web) total-vm:1kB\n[   13.0] Kernel pa",
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, GuestErrorKind::Oom);
        assert_eq!(
            found[0].what,
            "kernel: Out of memory: Killed process 211 (ferry-web) total-vm:1kB"
        );
        let found = s.push(b"nic - not syncing: VFS\n");
        assert_eq!(found[0].kind, GuestErrorKind::KernelPanic);
        assert_eq!(
            s.push(b"BUG: kernel NULL pointer dereference\n")[0].kind,
            GuestErrorKind::KernelOops
        );
    }

    #[test]
    fn tails_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let console = Arc::new(Mutex::new(
            ConsoleLog::open(&dir.path().join("console.log"), 1 << 20).unwrap(),
        ));
        let log = ErrorLog::new(dir.path(), console);
        log.record(&GuestError::now(GuestErrorKind::ServiceExited, "before"));
        let mut tail = ErrorsTail::new(dir.path(), false);
        assert!(tail.poll().is_empty());
        log.record(&GuestError::now(GuestErrorKind::ServiceExited, "after"));
        let got = tail.poll();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].what, "after");
        assert!(tail.poll().is_empty());
        assert_eq!(last_error(dir.path()).unwrap().what, "after");
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
        assert!(console.contains("[ferry] error: after"), "{console}");
    }
}
