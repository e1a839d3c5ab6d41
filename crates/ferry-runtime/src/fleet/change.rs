//! What a fleet command did to each VM, as data: `stop`, `restart`, `rm`
//! and `clean` return one [`VmChange`] per VM and report each as an
//! [`crate::Event::VmChanged`] as it happens. Its `Display` is the line
//! `ferry` prints for it, so that every caller words it the same way.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::StartedLine;
use crate::detach::Started;
use crate::record::RecordState;

/// What a fleet command did to one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum VmChange {
    /// Its owner stopped it (`stop`, the first half of `restart`).
    Stopped {
        /// The VM.
        name: String,
        /// What became of it: `suspended`, `discarded`, `shut down`.
        state: String,
        /// How long it took.
        ms: u64,
        /// Where its state is kept, if it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        saved: Option<String>,
    },
    /// It was still starting; its ferry process was sent SIGTERM, which
    /// cancels a start.
    StartCancelled {
        /// The VM.
        name: String,
        /// The ferry process.
        pid: u32,
    },
    /// It was not running (`stop` without `--discard`).
    AlreadyStopped {
        /// The VM.
        name: String,
        /// Its state.
        state: RecordState,
    },
    /// A suspended or stopped VM's kept state was deleted (`stop --discard`).
    StateDeleted {
        /// The VM.
        name: String,
        /// What it was.
        was: RecordState,
    },
    /// What a crashed VM left was removed (`stop --discard`, `clean`).
    CrashCleaned {
        /// The VM.
        name: String,
        /// How it crashed, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        why: Option<String>,
    },
    /// A crashed VM: nothing to stop (`stop` without `--discard`).
    Crashed {
        /// The VM.
        name: String,
        /// Its record's note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// Whether `ferry start` can resume its last suspended state.
        resumable: bool,
    },
    /// A VM that crashed after `ferry start` is suspended again as it was
    /// before that start (`clean`).
    Resuspended {
        /// The VM.
        name: String,
    },
    /// It is live (again) (`restart`).
    Started(Started),
    /// It was running already (`restart` of a VM that another command
    /// started meanwhile).
    AlreadyRunning {
        /// The VM.
        name: String,
    },
    /// Its state was deleted (`rm`).
    Removed {
        /// The VM.
        name: String,
        /// What it was.
        was: RecordState,
        /// The user's own package it suspended into, which stays.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kept: Option<PathBuf>,
    },
}

impl VmChange {
    /// The VM it concerns.
    pub fn name(&self) -> &str {
        match self {
            VmChange::Stopped { name, .. }
            | VmChange::StartCancelled { name, .. }
            | VmChange::AlreadyStopped { name, .. }
            | VmChange::StateDeleted { name, .. }
            | VmChange::CrashCleaned { name, .. }
            | VmChange::Crashed { name, .. }
            | VmChange::Resuspended { name }
            | VmChange::AlreadyRunning { name }
            | VmChange::Removed { name, .. } => name,
            VmChange::Started(s) => &s.name,
        }
    }
}

impl fmt::Display for VmChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmChange::Stopped {
                name,
                state,
                ms,
                saved: Some(s),
            } => write!(f, "{name}: {state} in {ms} ms (state kept in {s})"),
            VmChange::Stopped {
                name, state, ms, ..
            } => write!(f, "{name}: {state} in {ms} ms"),
            VmChange::StartCancelled { name, pid } => write!(
                f,
                "{name}: was still starting; its ferry process (pid {pid}) was sent SIGTERM, which cancelled the start"
            ),
            VmChange::AlreadyStopped { name, state } => write!(f, "{name}: already {state}"),
            VmChange::StateDeleted { name, was } => {
                write!(f, "{name}: was {was}; its state is deleted")
            }
            VmChange::CrashCleaned { name, why: None } => {
                write!(f, "{name}: had crashed; what it left is removed")
            }
            VmChange::CrashCleaned {
                name,
                why: Some(why),
            } => write!(f, "{name}: removed (crashed: {why})"),
            VmChange::Crashed {
                name,
                note,
                resumable,
            } => write!(
                f,
                "{name}: crashed, nothing to stop ({}'ferry clean' removes what it left{})",
                note.as_deref().map(|n| format!("{n}; ")).unwrap_or_default(),
                if *resumable {
                    "; 'ferry start' resumes its last suspended state"
                } else {
                    ""
                }
            ),
            VmChange::Resuspended { name } => write!(
                f,
                "{name}: crashed; its leftovers are removed and it is suspended as it was before its last start: 'ferry start {name}' resumes it"
            ),
            VmChange::Started(s) => write!(f, "{}", StartedLine(s)),
            VmChange::AlreadyRunning { name } => write!(f, "{name}: already running"),
            VmChange::Removed {
                name,
                was,
                kept: Some(p),
            } => write!(
                f,
                "removed {name} ({was}); its package {} is yours and stays",
                p.display()
            ),
            VmChange::Removed { name, was, .. } => write!(f, "removed {name} ({was})"),
        }
    }
}
