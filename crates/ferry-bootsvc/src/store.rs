//! The store: everything the service knows, in one JSON file that each
//! write replaces whole (new file beside the old, fsync, rename, fsync of
//! the directory), so a crash leaves the old state or the new one, never a
//! mix. A write is on disk before it is answered: a service restarted right
//! after a `load` serves exactly what was loaded, cloud-init groups
//! included.
//!
//! One file fits what one service holds (a few thousand nodes: a few MiB);
//! a larger site wants a database, which is why the rest of the crate sees
//! only [`Store::read`] and [`Store::write`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::types::StoreState;

/// The store format's version; a store from a newer ferry is refused.
pub const STORE_VERSION: u32 = 1;

/// The state file inside the store directory.
const STATE_FILE: &str = "state.json";

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or the file could not be read or created.
    #[error("cannot use the store {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is not valid.
    #[error("the store file {path} is damaged: {source}")]
    Damaged {
        /// The path.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Written by a newer ferry.
    #[error(
        "the store file {path} has format version {found}; this ferry reads up to {STORE_VERSION}"
    )]
    Version {
        /// The path.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// The state in memory and the file it is kept in.
#[derive(Debug)]
pub struct Store {
    file: PathBuf,
    dir: PathBuf,
    state: RwLock<StoreState>,
    /// Serialises writers, so that each write starts from the last one's
    /// result and files are replaced in order.
    writer: Mutex<()>,
}

impl Store {
    /// Opens the store in `dir` (created if missing), reading its state.
    ///
    /// # Errors
    /// [`StoreError`] if the directory cannot be created or the file is
    /// unreadable, damaged or too new.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = dir.join(STATE_FILE);
        let state = match std::fs::read(&file) {
            Ok(bytes) => {
                let state: StoreState =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Damaged {
                        path: file.clone(),
                        source,
                    })?;
                if state.version > STORE_VERSION {
                    return Err(StoreError::Version {
                        path: file,
                        found: state.version,
                    });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreState {
                version: STORE_VERSION,
                ..StoreState::default()
            },
            Err(source) => return Err(StoreError::Io { path: file, source }),
        };
        Ok(Store {
            file,
            dir: dir.to_path_buf(),
            state: RwLock::new(state),
            writer: Mutex::new(()),
        })
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&StoreState) -> T) -> T {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        f(&state)
    }

    /// Changes the state: `f` works on a copy; if it succeeds and changed
    /// something, the copy is written to disk and then becomes the state.
    /// If `f` or the write fails, nothing changes.
    ///
    /// # Errors
    /// What `f` returns, or the write's [`StoreError`] turned into `E`.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut StoreState) -> Result<T, E>,
    ) -> Result<T, E> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut copy = self.read(Clone::clone);
        let result = f(&mut copy)?;
        let changed = self.read(|s| *s != copy);
        if changed {
            copy.version = STORE_VERSION;
            self.persist(&copy)?;
            *self.state.write().unwrap_or_else(|e| e.into_inner()) = copy;
        }
        Ok(result)
    }

    fn persist(&self, state: &StoreState) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.file.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(state).expect("the state serialises");
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &self.file).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Component;

    #[test]
    fn writes_survive_reopening_and_failed_writes_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|s| {
                s.components.insert(
                    "x1c0s0b0n0".into(),
                    Component {
                        id: "x1c0s0b0n0".into(),
                        ..Component::default()
                    },
                );
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let failed: Result<(), StoreError> = store.write(|s| {
            s.components.clear();
            Err(StoreError::Version {
                path: PathBuf::new(),
                found: 9,
            })
        });
        assert!(failed.is_err());
        assert_eq!(store.read(|s| s.components.len()), 1);
        drop(store);
        let again = Store::open(dir.path()).unwrap();
        assert!(again.read(|s| s.components.contains_key("x1c0s0b0n0")));
    }

    #[test]
    fn a_newer_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), br#"{"version":99}"#).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Version { found: 99, .. })
        ));
    }
}
