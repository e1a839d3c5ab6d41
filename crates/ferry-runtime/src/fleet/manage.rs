//! `ferry stop`, `start`, `restart`, `rm`, `clean` and `logs`: one VM or
//! all of them, several at the same time, one line each.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::control::{call, ControlReply, ControlRequest};
use crate::detach::{choice_of, launch, DetachSpec, StartFrom, Started};
use crate::error::{FileError, FleetError, NameError, StartError, VmError};
use crate::events::{Event, EventSink};
use crate::record::{RecordState, VmRecord};
use crate::vmdir::{files, remove_leftover_network, running_vm_dir, VmDir};
use crate::{Cancel, Paths};

use super::ps::{crash_note, list, state_of};
use super::{StartedLine, VmChange, READY_TIMEOUT};

/// Which VMs a command works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One, by name.
    One(String),
    /// Every VM (`--all`).
    All,
}

/// `ferry stop NAME|--all [--discard]`: suspends running VMs (state kept,
/// `ferry start` resumes them), or with `discard` shuts them down and drops
/// their state — also the saved state of suspended and stopped VMs, and
/// what crashed ones left. Reports each VM's [`VmChange`] as it is done
/// and returns them all; fails if any failed.
pub fn stop(
    paths: &Paths,
    target: &Target,
    discard: bool,
    events: &dyn EventSink,
) -> Result<Vec<VmChange>, FleetError> {
    let names = match target {
        Target::One(n) => {
            if state_of(paths, n).is_none() {
                return Err(unknown(paths, n));
            }
            vec![n.clone()]
        }
        Target::All => list(paths).into_iter().map(|v| v.name).collect(),
    };
    if names.is_empty() {
        events.emit(Event::Notice {
            message: "no VMs".into(),
        });
        return Ok(Vec::new());
    }
    let results = stop_all(paths, names.clone(), discard);
    settle(&names, results, "stop", events)
}

/// Reports each VM's change, and fails with one error naming every
/// failure, if there are any.
fn settle(
    names: &[String],
    results: Vec<Result<VmChange, FleetError>>,
    what: &str,
    events: &dyn EventSink,
) -> Result<Vec<VmChange>, FleetError> {
    let mut changes = Vec::new();
    let mut failures = Vec::new();
    let mut code = 0;
    for (name, r) in names.iter().zip(results) {
        match r {
            Ok(c) => {
                events.emit(Event::VmChanged(c.clone()));
                changes.push(c);
            }
            Err(e) => {
                if code == 0 {
                    code = e.exit_class().code();
                }
                failures.push(named(name, &e));
            }
        }
    }
    if failures.is_empty() {
        return Ok(changes);
    }
    Err(FleetError::Several {
        summary: format!("could not {what} {} of {} VMs", failures.len(), names.len()),
        failures,
        code,
    })
}

/// `NAME: error`, unless the error names the VM already.
fn named(name: &str, e: &FleetError) -> String {
    let text = e.to_string();
    if text.starts_with(&format!("{name}: ")) {
        text
    } else {
        format!("{name}: {text}")
    }
}

pub(super) fn unknown(paths: &Paths, name: &str) -> FleetError {
    NameError::UnknownVm {
        name: name.to_string(),
        dir: paths.vms(),
    }
    .into()
}

/// Stops each of `names` at the same time; one result per name, in order.
pub(super) fn stop_all(
    paths: &Paths,
    names: Vec<String>,
    discard: bool,
) -> Vec<Result<VmChange, FleetError>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| scope.spawn(move || stop_one(paths, n, discard)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(FleetError::Internal("stopping panicked".into())))
            })
            .collect()
    })
}

fn stop_one(paths: &Paths, name: &str, discard: bool) -> Result<VmChange, FleetError> {
    let Some((state, record)) = state_of(paths, name) else {
        return Err(unknown(paths, name));
    };
    let dir = paths.vms().join(name);
    match state {
        RecordState::Running => {}
        RecordState::Suspended | RecordState::Stopped if discard => {
            remove_state(paths, name)?;
            return Ok(VmChange::StateDeleted {
                name: name.to_string(),
                was: state,
            });
        }
        RecordState::Suspended | RecordState::Stopped => {
            return Ok(VmChange::AlreadyStopped {
                name: name.to_string(),
                state,
            });
        }
        RecordState::Crashed if discard => {
            remove_state(paths, name)?;
            return Ok(VmChange::CrashCleaned {
                name: name.to_string(),
                why: None,
            });
        }
        RecordState::Crashed => {
            return Ok(VmChange::Crashed {
                name: name.to_string(),
                note: record.as_ref().and_then(|r| r.note.clone()),
                resumable: record.as_ref().is_some_and(VmRecord::resumable),
            });
        }
    }
    let control = dir.join(files::CONTROL);
    let t = Instant::now();
    let reply = call(
        &control,
        &ControlRequest::Stop { discard },
        Duration::from_secs(900),
    );
    match reply {
        Ok(ControlReply::Stopped { state, ms, saved }) => {
            wait_not_running(paths, name, Duration::from_secs(60))?;
            Ok(VmChange::Stopped {
                name: name.to_string(),
                state,
                ms,
                saved,
            })
        }
        Ok(ControlReply::Error { message }) if message.contains("still starting") => {
            stop_foreground(paths, name, &control)
        }
        Ok(ControlReply::Error { message }) => Err(VmError::Control {
            path: control,
            detail: message,
        }
        .into()),
        Ok(other) => Err(VmError::Control {
            path: control,
            detail: format!("unexpected reply {other:?}"),
        }
        .into()),
        Err(e) => {
            // The supervisor may have finished and exited before its answer
            // went out: the directory says what happened.
            wait_not_running(paths, name, Duration::from_secs(30)).map_err(|_| e)?;
            Ok(VmChange::Stopped {
                name: name.to_string(),
                state: match state_of(paths, name) {
                    None => "discarded".to_string(),
                    Some((s, _)) => s.to_string(),
                },
                ms: t.elapsed().as_millis() as u64,
                saved: None,
            })
        }
    }
}

/// A VM whose owner does not hold it yet (it is still starting) is stopped
/// the way Ctrl-C stops it: SIGTERM to its ferry process, which cancels
/// the start.
fn stop_foreground(paths: &Paths, name: &str, control: &Path) -> Result<VmChange, FleetError> {
    let pid = match call(control, &ControlRequest::Status, Duration::from_secs(5))? {
        ControlReply::Status(s) => s.pid,
        other => {
            return Err(VmError::Control {
                path: control.to_path_buf(),
                detail: format!("unexpected reply {other:?}"),
            }
            .into())
        }
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    wait_not_running(paths, name, Duration::from_secs(300))?;
    Ok(VmChange::StartCancelled {
        name: name.to_string(),
        pid,
    })
}

/// Waits until VM `name` no longer runs and its directory is settled: gone,
/// or kept (a lock file that nobody holds). A directory without its lock
/// file is still being removed by the VM's process.
fn wait_not_running(paths: &Paths, name: &str, timeout: Duration) -> Result<(), FleetError> {
    let t = Instant::now();
    let dir = paths.vms().join(name);
    let settled =
        || running_vm_dir(paths, name).is_err() && (!dir.exists() || dir.join("lock").exists());
    while !settled() {
        if t.elapsed() > timeout {
            return Err(FleetError::StopTimedOut {
                name: name.to_string(),
                secs: timeout.as_secs(),
                log: paths.vms().join(name).join(files::SUPERVISOR_LOG),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Deletes the directory of a VM that is not running: its record, its own
/// saved package, its logs, and the namespace a crash left. Never a
/// package of the user's.
pub(super) fn remove_state(paths: &Paths, name: &str) -> Result<(), FleetError> {
    let dir = VmDir::resume(paths, name)?;
    dir.remove_all();
    Ok(())
}

/// `ferry start NAME`: resumes a suspended VM, detached, with the network
/// and fleet it had.
pub fn start(
    paths: &Paths,
    ferry: &Path,
    name: &str,
    live_timeout: Duration,
    cancel: &Cancel,
) -> Result<Option<Started>, FleetError> {
    resume(paths, ferry, name, None, live_timeout, cancel)
}

/// [`start`], and with `serve` the resumed VM serves its next migration
/// there (a control-plane worker's instance stays movable). Returns `None`
/// if it runs already.
pub fn resume(
    paths: &Paths,
    ferry: &Path,
    name: &str,
    serve: Option<crate::detach::Serve>,
    live_timeout: Duration,
    cancel: &Cancel,
) -> Result<Option<Started>, FleetError> {
    let Some((state, record)) = state_of(paths, name) else {
        return Err(unknown(paths, name));
    };
    if state == RecordState::Running {
        return Ok(None);
    }
    let Some(record) = record else {
        return Err(StartError::NothingToResume {
            name: name.to_string(),
            why: "it ran in the foreground and left no saved state here; 'ferry clean' removes what it left".into(),
        }
        .into());
    };
    if !record.resumable() {
        return Err(StartError::NothingToResume {
            name: name.to_string(),
            why: format!(
                "it is {state} with no saved state: {}",
                record.note.as_deref().unwrap_or("it never was suspended")
            ),
        }
        .into());
    }
    let spec = DetachSpec {
        name: name.to_string(),
        from: StartFrom::Saved { serve },
        accel: choice_of(record.accel),
        net: record.net.clone(),
        fleet: record.fleet.clone(),
        live_timeout_s: live_timeout.as_secs(),
    };
    Ok(launch(ferry, paths, &spec)?
        .wait(READY_TIMEOUT, cancel, None)
        .map(Some)?)
}

/// One line for a started (or already running) VM.
pub fn started_line(name: &str, started: Option<&Started>) -> String {
    match started {
        Some(s) => StartedLine(s).to_string(),
        None => format!("{name}: already running"),
    }
}

/// `ferry restart NAME|--all`: suspends each running VM and resumes it
/// (suspended VMs are just started). With `--all`, every running VM, at
/// the same time.
pub fn restart(
    paths: &Paths,
    ferry: &Path,
    target: &Target,
    live_timeout: Duration,
    events: &dyn EventSink,
) -> Result<Vec<VmChange>, FleetError> {
    let names: Vec<String> = match target {
        Target::One(n) => {
            if state_of(paths, n).is_none() {
                return Err(unknown(paths, n));
            }
            vec![n.clone()]
        }
        Target::All => list(paths)
            .into_iter()
            .filter(|v| v.state == RecordState::Running)
            .map(|v| v.name)
            .collect(),
    };
    if names.is_empty() {
        events.emit(Event::Notice {
            message: "no running VMs".into(),
        });
        return Ok(Vec::new());
    }
    let results: Vec<Result<VmChange, FleetError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                scope.spawn(move || -> Result<VmChange, FleetError> {
                    if matches!(state_of(paths, n), Some((RecordState::Running, _))) {
                        stop_one(paths, n, false)?;
                    }
                    Ok(
                        match start(paths, ferry, n, live_timeout, &Cancel::new())? {
                            Some(s) => VmChange::Started(s),
                            None => VmChange::AlreadyRunning {
                                name: n.to_string(),
                            },
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(FleetError::Internal("restart panicked".into())))
            })
            .collect()
    });
    settle(&names, results, "restart", events)
}

/// `ferry rm NAME`: deletes the state of a VM that is not running (its
/// record, its own saved package, its logs). A package of the user's that
/// a `run --detach` VM suspended into is left alone.
pub fn rm(paths: &Paths, name: &str) -> Result<VmChange, FleetError> {
    let Some((state, record)) = state_of(paths, name) else {
        return Err(unknown(paths, name));
    };
    if state == RecordState::Running {
        return Err(FleetError::StillRunning {
            name: name.to_string(),
        });
    }
    let dir = paths.vms().join(name);
    let kept = record
        .as_ref()
        .filter(|r| !r.owns_saved(&dir))
        .and_then(|r| r.saved.clone());
    remove_state(paths, name)?;
    Ok(VmChange::Removed {
        name: name.to_string(),
        was: state,
        kept,
    })
}

/// `ferry clean`: removes what crashed VMs left (state directories,
/// namespaces with their links and rules). A crashed VM that still has a
/// saved state (it crashed after `ferry start`) is turned back into a
/// suspended one instead. Never touches a running, suspended or stopped VM.
pub fn clean(paths: &Paths, events: &dyn EventSink) -> Result<Vec<VmChange>, FleetError> {
    let mut cleaned = Vec::new();
    for v in list(paths) {
        if v.state != RecordState::Crashed {
            continue;
        }
        let name = &v.name;
        let dir = match VmDir::resume(paths, name) {
            Ok(d) => d,
            Err(NameError::NameInUse { .. }) => continue, // started meanwhile
            Err(e) => return Err(e.into()),
        };
        // What a crash mid-start leaves before net.json exists.
        if !dir.path().join(files::NET).exists() {
            let ns = format!("{}-{name}", paths.net_prefix);
            if let Ok(true) = ferry_net::vmnet::remove_leftover_namespace(&ns) {
                tracing::info!(netns = ns, "removed a namespace left without a record");
            }
        }
        remove_leftover_network(dir.path());
        let record = VmRecord::load(dir.path());
        let why = crash_note(record.as_ref());
        let change = match record.filter(VmRecord::resumable) {
            Some(mut record) => {
                record.state = RecordState::Suspended;
                record.note = Some(format!(
                    "crashed after its last start ({why}); suspended again as it was before that start"
                ));
                record.save(dir.path())?;
                VmChange::Resuspended { name: name.clone() }
            }
            None => {
                dir.remove_all();
                VmChange::CrashCleaned {
                    name: name.clone(),
                    why: Some(why),
                }
            }
        };
        events.emit(Event::VmChanged(change.clone()));
        cleaned.push(change);
    }
    if cleaned.is_empty() {
        events.emit(Event::Notice {
            message: "nothing to clean".into(),
        });
    }
    Ok(cleaned)
}

/// `ferry logs NAME [-f]`: writes the VM's console log (or, with
/// `supervisor`, what its supervisor logged) to `out`; with `follow`, keeps
/// writing what comes while the VM runs.
pub fn logs(
    paths: &Paths,
    name: &str,
    follow: bool,
    supervisor: bool,
    out: &mut dyn Write,
) -> Result<(), FleetError> {
    if state_of(paths, name).is_none() {
        return Err(unknown(paths, name));
    }
    let dir = paths.vms().join(name);
    let (current, old) = if supervisor {
        (dir.join(files::SUPERVISOR_LOG), None)
    } else {
        (dir.join(files::CONSOLE), Some(dir.join(files::CONSOLE_OLD)))
    };
    let io_out = |e| FileError::at("standard output")(e);
    if let Some(old) = old {
        if let Ok(bytes) = std::fs::read(&old) {
            out.write_all(&bytes).map_err(io_out)?;
        }
    }
    let mut offset = 0u64;
    let mut inode = None;
    loop {
        use std::os::unix::fs::MetadataExt;
        if let Ok(mut f) = std::fs::File::open(&current) {
            let meta = f.metadata().map_err(FileError::at(&current))?;
            if inode != Some(meta.ino()) || meta.len() < offset {
                // New or rotated: from its start.
                inode = Some(meta.ino());
                offset = 0;
            }
            f.seek(SeekFrom::Start(offset))
                .map_err(FileError::at(&current))?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(FileError::at(&current))?;
            offset += bytes.len() as u64;
            out.write_all(&bytes).map_err(io_out)?;
            out.flush().map_err(io_out)?;
        }
        if !follow {
            return Ok(());
        }
        let running = running_vm_dir(paths, name).is_ok();
        if !running {
            // One more read catches what came before it stopped.
            if let Ok(meta) = std::fs::metadata(&current) {
                use std::os::unix::fs::MetadataExt;
                if Some(meta.ino()) == inode && meta.len() > offset {
                    continue;
                }
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
