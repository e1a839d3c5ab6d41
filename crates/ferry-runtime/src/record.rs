//! A detached VM's record, `<vm dir>/vm.json`: what the VM is (where it
//! came from, its network, its fleet) and what state it is in, for the
//! commands that manage VMs which have no process of their own while they
//! are suspended (`ferry ps`, `start`, `rm`, `clean`).
//!
//! The record outlives the VM's supervisor whenever the VM is not running:
//! [`crate::vmdir::VmDir::remove`] keeps the record, the saved package and
//! the logs of a suspended, stopped or crashed VM, and removes the rest.

use std::path::{Path, PathBuf};

use ferry_engine::Accel;
use serde::{Deserialize, Serialize};

use crate::error::FileError;
use crate::vm::NetChoice;
use crate::vmdir::files;

/// What the record says the VM is doing. Whether it really runs is the
/// directory's lock: a record that says `running` in an unlocked directory
/// belongs to a VM whose supervisor died (`ferry ps` shows it `crashed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// Its supervisor runs it.
    Running,
    /// Saved into a package ([`VmRecord::saved`]); `ferry start` resumes it.
    Suspended,
    /// The guest powered off by itself.
    Stopped,
    /// The guest or its engine died; [`VmRecord::note`] says how.
    Crashed,
}

impl std::fmt::Display for RecordState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordState::Running => "running",
            RecordState::Suspended => "suspended",
            RecordState::Stopped => "stopped",
            RecordState::Crashed => "crashed",
        })
    }
}

/// The network a detached VM gets, every time it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// `--net none`.
    #[serde(default)]
    pub none: bool,
    /// `--netns`.
    #[serde(default)]
    pub netns: Option<String>,
    /// Exposed ports.
    #[serde(default)]
    pub exposes: Vec<ferry_net::ExposeSpec>,
}

impl NetSpec {
    /// The supervisor's view.
    pub fn choice(&self) -> NetChoice {
        if self.none {
            NetChoice::None
        } else {
            NetChoice::Namespace {
                netns: self.netns.clone(),
                exposes: self.exposes.clone(),
            }
        }
    }

    /// From the supervisor's view.
    pub fn from_choice(choice: &NetChoice) -> Self {
        match choice {
            NetChoice::None => NetSpec {
                none: true,
                ..NetSpec::default()
            },
            NetChoice::Namespace { netns, exposes } => NetSpec {
                none: false,
                netns: netns.clone(),
                exposes: exposes.clone(),
            },
        }
    }
}

/// The fleet a VM belongs to: the VMs of one `ferry up`, which see each
/// other by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSpec {
    /// The fleet's name (the `--name-prefix` of `ferry up`).
    pub name: String,
    /// The guest port every member serves on; other members reach it at
    /// the gateway and the host port it is exposed on.
    pub guest_port: u16,
}

/// `<vm dir>/vm.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's name.
    pub name: String,
    /// What it is doing.
    pub state: RecordState,
    /// The package it was first started from.
    pub package: PathBuf,
    /// Whether it is a copy-on-write clone of [`VmRecord::package`] (its
    /// first suspend writes a package of its own, [`files::SAVED`]).
    pub clone: bool,
    /// The package its state is saved in, once it has one: its own
    /// [`files::SAVED`], or the package it runs from without `--clone`.
    #[serde(default)]
    pub saved: Option<PathBuf>,
    /// Its fleet, if it has one.
    #[serde(default)]
    pub fleet: Option<FleetSpec>,
    /// Its network.
    #[serde(default)]
    pub net: NetSpec,
    /// The accelerator it runs with (its package's).
    pub accel: Accel,
    /// Guest memory.
    pub memory_mib: u64,
    /// The pid of its last supervisor.
    pub supervisor_pid: u32,
    /// When its last supervisor started it (seconds since the Unix epoch).
    pub started_unix: u64,
    /// Why it stopped or crashed, with the guest's last console lines.
    #[serde(default)]
    pub note: Option<String>,
}

impl VmRecord {
    /// The record in VM directory `dir`, if there is a readable one.
    pub fn load(dir: &Path) -> Option<VmRecord> {
        let bytes = std::fs::read(dir.join(files::RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the record into `dir` atomically (temp + rename).
    pub fn save(&self, dir: &Path) -> Result<(), FileError> {
        let tmp = dir.join(format!(".{}.tmp", files::RECORD));
        let dest = dir.join(files::RECORD);
        let bytes = serde_json::to_vec_pretty(self).expect("the record serialises");
        std::fs::write(&tmp, bytes).map_err(FileError::at(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(FileError::at(&dest))
    }

    /// Whether its saved state is a package in its own directory (which
    /// goes with the VM), rather than a package of the user's.
    pub fn owns_saved(&self, dir: &Path) -> bool {
        self.saved.as_deref() == Some(dir.join(files::SAVED).as_path())
    }

    /// Whether there is a saved state to resume.
    pub fn resumable(&self) -> bool {
        self.saved.as_deref().is_some_and(Path::exists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path) -> VmRecord {
        VmRecord {
            name: "web-0".into(),
            state: RecordState::Running,
            package: "/p/web.ferry".into(),
            clone: true,
            saved: None,
            fleet: Some(FleetSpec {
                name: "web".into(),
                guest_port: 8000,
            }),
            net: NetSpec {
                none: false,
                netns: None,
                exposes: vec!["127.0.0.1:18100:8000".parse().unwrap()],
            },
            accel: Accel::Tcg,
            memory_mib: 256,
            supervisor_pid: 1,
            started_unix: 2,
            note: None,
        }
        .with_saved(dir)
    }

    impl VmRecord {
        fn with_saved(mut self, dir: &Path) -> Self {
            self.saved = Some(dir.join(files::SAVED));
            self
        }
    }

    #[test]
    fn a_record_round_trips_and_knows_whose_package_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let r = record(tmp.path());
        r.save(tmp.path()).unwrap();
        let back = VmRecord::load(tmp.path()).unwrap();
        assert_eq!(back, r);
        assert!(back.owns_saved(tmp.path()));
        assert!(!back.resumable());
        std::fs::write(tmp.path().join(files::SAVED), b"x").unwrap();
        assert!(back.resumable());
        let text = std::fs::read_to_string(tmp.path().join(files::RECORD)).unwrap();
        assert!(text.contains("\"state\": \"running\""), "{text}");
    }

    #[test]
    fn net_spec_maps_to_the_supervisors_choice_and_back() {
        for spec in [
            NetSpec {
                none: true,
                ..NetSpec::default()
            },
            NetSpec {
                none: false,
                netns: Some("n1".into()),
                exposes: vec!["18100:8000".parse().unwrap()],
            },
        ] {
            assert_eq!(NetSpec::from_choice(&spec.choice()), spec);
        }
    }
}
