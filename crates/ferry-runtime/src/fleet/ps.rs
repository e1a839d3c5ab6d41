//! `ferry ps`: what each VM of the state directory is doing, from its
//! directory's lock, its record and (while it runs) its supervisor.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use ferry_engine::Accel;
use ferry_net::ExposeSpec;
use serde::Serialize;

use crate::control::{call, ControlReply, ControlRequest};
use crate::record::{RecordState, VmRecord};
use crate::vmdir::{files, last_lines, running_vm_dir, validate_name};
use crate::Paths;

/// What `ferry ps` knows of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    /// Its name.
    pub name: String,
    /// `running`, `suspended`, `stopped` or `crashed`.
    pub state: RecordState,
    /// Its supervisor's pid, while it runs.
    pub pid: Option<u32>,
    /// Its engine's pid, while it runs.
    pub engine_pid: Option<u32>,
    /// Its engine's cgroup, while it runs in one of its own.
    pub cgroup: Option<String>,
    /// Its accelerator.
    pub accel: Option<Accel>,
    /// Seconds since its supervisor started it, while it runs.
    pub uptime_s: Option<u64>,
    /// Its guest memory.
    pub memory_mib: Option<u64>,
    /// Host memory only its engine uses (see [`unique_memory_mib`]).
    pub unique_memory_mib: Option<u64>,
    /// Its exposed ports (those it gets again when started, if it is not
    /// running).
    pub exposes: Vec<ExposeSpec>,
    /// Its fleet.
    pub fleet: Option<String>,
    /// Whether it was started detached (has a record).
    pub detached: bool,
    /// Why it stopped or crashed.
    pub note: Option<String>,
    /// The guest's last console lines, for a crashed VM.
    pub console_tail: Vec<String>,
    /// The last error seen in the guest (`docs/shell.md`).
    pub last_error: Option<crate::guest_errors::GuestError>,
}

/// `ferry ps --json`: one object per VM with exactly these keys.
#[derive(Debug, Clone, Serialize)]
pub struct PsJson {
    /// Name.
    pub name: String,
    /// State.
    pub state: RecordState,
    /// Supervisor pid.
    pub pid: Option<u32>,
    /// The engine's (QEMU's) pid.
    pub engine_pid: Option<u32>,
    /// The engine's cgroup directory (`docs/security.md`).
    pub cgroup: Option<String>,
    /// Accelerator.
    pub accel: Option<Accel>,
    /// Uptime.
    pub uptime_s: Option<u64>,
    /// Guest memory.
    pub memory_mib: Option<u64>,
    /// Unique host memory.
    pub unique_memory_mib: Option<u64>,
    /// Exposed ports.
    pub exposes: Vec<PsExpose>,
    /// The last error seen in the guest: `{"unix_ms", "kind", "what"}`.
    pub last_error: Option<crate::guest_errors::GuestError>,
}

/// One exposed port in [`PsJson`].
#[derive(Debug, Clone, Serialize)]
pub struct PsExpose {
    /// `ADDR:PORT` on the host.
    pub host: String,
    /// The guest port.
    pub guest: u16,
}

impl From<&VmInfo> for PsJson {
    fn from(v: &VmInfo) -> Self {
        PsJson {
            name: v.name.clone(),
            state: v.state,
            pid: v.pid,
            engine_pid: v.engine_pid,
            cgroup: v.cgroup.clone(),
            accel: v.accel,
            uptime_s: v.uptime_s,
            memory_mib: v.memory_mib,
            unique_memory_mib: v.unique_memory_mib,
            exposes: v
                .exposes
                .iter()
                .map(|e| PsExpose {
                    host: e.host_addr().to_string(),
                    guest: e.guest_port,
                })
                .collect(),
            last_error: v.last_error.clone(),
        }
    }
}

/// `ferry ps`: every VM of the state directory, by name.
pub fn list(paths: &Paths) -> Vec<VmInfo> {
    let mut names: Vec<String> = std::fs::read_dir(paths.vms())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    names.iter().filter_map(|n| info(paths, n)).collect()
}

/// What `ps` shows for VM `name`, if there is one.
pub fn info(paths: &Paths, name: &str) -> Option<VmInfo> {
    let (state, record) = state_of(paths, name)?;
    let dir = paths.vms().join(name);
    let mut v = VmInfo {
        name: name.to_string(),
        state,
        pid: None,
        engine_pid: None,
        cgroup: None,
        accel: record.as_ref().map(|r| r.accel),
        uptime_s: None,
        memory_mib: record.as_ref().map(|r| r.memory_mib),
        unique_memory_mib: None,
        exposes: record
            .as_ref()
            .map(|r| r.net.exposes.clone())
            .unwrap_or_default(),
        fleet: record
            .as_ref()
            .and_then(|r| r.fleet.as_ref().map(|f| f.name.clone())),
        detached: record.is_some(),
        note: record.as_ref().and_then(|r| r.note.clone()),
        console_tail: Vec::new(),
        last_error: crate::guest_errors::last_error(&dir),
    };
    match state {
        RecordState::Running => {
            match call(
                &dir.join(files::CONTROL),
                &ControlRequest::Status,
                Duration::from_secs(3),
            ) {
                Ok(ControlReply::Status(s)) => {
                    v.pid = Some(s.pid);
                    v.engine_pid = s.engine_pid;
                    v.cgroup = s.cgroup;
                    v.accel = Some(s.accel);
                    v.uptime_s = Some(s.uptime_s);
                    v.memory_mib = Some(s.memory_mib);
                    v.exposes = s.exposes;
                }
                _ => {
                    // Starting (no socket yet) or busy: what the directory says.
                    v.pid = std::fs::read_to_string(dir.join("pid"))
                        .ok()
                        .and_then(|p| p.trim().parse().ok());
                }
            }
            v.unique_memory_mib = v.engine_pid.and_then(unique_memory_mib);
        }
        RecordState::Crashed => {
            let mut note = crash_note(record.as_ref());
            if record.as_ref().is_some_and(VmRecord::resumable) {
                note.push_str("; 'ferry start' resumes it as it was when last suspended");
            }
            v.note = Some(note);
            v.console_tail = console_tail(&dir, 5);
        }
        RecordState::Suspended | RecordState::Stopped => {}
    }
    Some(v)
}

/// Why a crashed VM is not running.
pub(super) fn crash_note(record: Option<&VmRecord>) -> String {
    match record {
        Some(VmRecord {
            note: Some(note), ..
        }) => note.clone(),
        Some(r) => format!(
            "its supervisor (pid {}) is gone: killed, or the host went down",
            r.supervisor_pid
        ),
        None => "its ferry process is gone: killed, or the host went down".into(),
    }
}

/// The state of VM `name` and its record; `None` if there is no such VM.
pub fn state_of(paths: &Paths, name: &str) -> Option<(RecordState, Option<VmRecord>)> {
    validate_name(name).ok()?;
    let dir = paths.vms().join(name);
    // Every VM's directory has its lock file from the start; one without is
    // being removed by the process that owned it.
    if !dir.join("lock").exists() {
        return None;
    }
    let record = VmRecord::load(&dir);
    if running_vm_dir(paths, name).is_ok() {
        return Some((RecordState::Running, record));
    }
    let state = match record.as_ref().map(|r| r.state) {
        Some(s @ (RecordState::Suspended | RecordState::Stopped)) => s,
        _ if dir.join(files::SAVED).exists() && record.is_none() => RecordState::Suspended,
        _ => RecordState::Crashed,
    };
    Some((state, record))
}

/// Host memory only this engine process uses: `Private_Clean +
/// Private_Dirty + Private_Hugetlb` of `/proc/PID/smaps_rollup` (its USS).
/// For a clone that is the guest pages it has written (copied on write out
/// of the shared package memory), the package pages no other process
/// maps, and QEMU's own memory; pages it shares with other clones are not
/// counted, as stopping it would not free them.
pub fn unique_memory_mib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(private_kib(&text) / 1024)
}

/// The sum of the `Private_*` fields of a `smaps_rollup`, in KiB.
pub(super) fn private_kib(smaps_rollup: &str) -> u64 {
    smaps_rollup
        .lines()
        .filter(|l| l.starts_with("Private_"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The last `n` lines of VM directory `dir`'s console log, after the line
/// that says the kernel panicked if there is one not long before them
/// (a panic's register dump and call trace would hide it).
fn console_tail(dir: &Path, n: usize) -> Vec<String> {
    let lines = console_lines(dir, 60);
    let tail = lines[lines.len().saturating_sub(n)..].to_vec();
    match lines.iter().rposition(|l| l.contains("Kernel panic")) {
        Some(i) if i + n < lines.len() => {
            let mut out = vec![lines[i].clone(), "…".into()];
            out.extend(tail);
            out
        }
        _ => tail,
    }
}

/// The last `n` lines of VM directory `dir`'s console log.
/// The last `n` lines of the console log of the VM in `dir`.
pub fn console_lines(dir: &Path, n: usize) -> Vec<String> {
    let path = dir.join(files::CONSOLE);
    let Ok(mut f) = std::fs::File::open(&path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    last_lines(&bytes, n)
}
