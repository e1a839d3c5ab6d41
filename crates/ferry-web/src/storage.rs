//! Values on the VM's disk: one file per key in one directory.
//!
//! A file per key keeps the store inspectable from a shell in the guest
//! (`ls /var/lib/ferry-web`), needs no index to repair, and makes each write
//! independent: a value is written to a temporary file, `fsync`ed and
//! renamed over the old one, then the directory is `fsync`ed. A crash (or a
//! snapshot taken mid-write) leaves the old value or the new one, never a
//! torn one, and a `201`/`200` answer means the value is on the disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest key.
pub const MAX_KEY: usize = 128;

/// Largest value, in bytes.
pub const MAX_VALUE: usize = 1024 * 1024;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The key is not one the store takes.
    #[error("'{0}' is not a key: use 1-128 of A-Z a-z 0-9 '.' '_' '-', not starting with '.'")]
    BadKey(String),
    /// The value is too large.
    #[error("the value is {0} bytes; at most {MAX_VALUE} bytes can be stored")]
    TooLarge(usize),
    /// No such key.
    #[error("no value stored under '{0}'")]
    NotFound(String),
    /// The disk said no.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl StorageError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks a key. Keys are used as file names, so the rule keeps out `/`,
/// `..` and the store's own temporary files (which start with `.`).
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let ok = (1..=MAX_KEY).contains(&key.len())
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::BadKey(
            key.chars().take(MAX_KEY + 1).collect(),
        ))
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store in `dir`, created if missing.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        check_key(key)?;
        let path = self.dir.join(key);
        match std::fs::read(&path) {
            Ok(value) => Ok(value),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(key.to_owned()))
            }
            Err(e) => Err(StorageError::io(&path)(e)),
        }
    }

    /// Stores `value` under `key`; returns whether the key is new.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<bool, StorageError> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        check_key(key)?;
        if value.len() > MAX_VALUE {
            return Err(StorageError::TooLarge(value.len()));
        }
        // Someone may have removed the directory from a shell.
        std::fs::create_dir_all(&self.dir).map_err(StorageError::io(&self.dir))?;
        let path = self.dir.join(key);
        let tmp = self.dir.join(format!(
            ".{key}.tmp-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(value)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::io(&tmp)(e));
        }
        let new = !path.exists();
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::io(&path)(e));
        }
        self.sync_dir()?;
        Ok(new)
    }

    /// Removes `key`.
    pub fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        let path = self.dir.join(key);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(key.to_owned()))
            }
            Err(e) => Err(StorageError::io(&path)(e)),
        }
    }

    /// How many keys are stored (temporary files do not count). A missing
    /// directory holds none.
    pub fn count(&self) -> Result<usize, StorageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StorageError::io(&self.dir)(e)),
        };
        let mut n = 0;
        for entry in entries {
            let entry = entry.map_err(StorageError::io(&self.dir))?;
            let is_key = entry
                .file_name()
                .to_str()
                .is_some_and(|k| check_key(k).is_ok());
            if is_key && entry.file_type().is_ok_and(|t| t.is_file()) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Makes renames and removals in the directory durable.
    fn sync_dir(&self) -> Result<(), StorageError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(StorageError::io(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_keys() {
        for good in ["a", "user-1", "v1.2_x", &"k".repeat(MAX_KEY)] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "a%2Fb",
            &"k".repeat(MAX_KEY + 1),
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn puts_gets_deletes_and_counts() {
        let dir = std::env::temp_dir().join(format!("ferry-web-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("store")).unwrap();
        assert_eq!(store.count().unwrap(), 0);
        assert!(store.put("k", b"v1").unwrap());
        assert!(!store.put("k", b"v2").unwrap());
        assert_eq!(store.get("k").unwrap(), b"v2");
        assert!(store.put("empty", b"").unwrap());
        assert_eq!(store.count().unwrap(), 2);
        store.delete("k").unwrap();
        assert!(matches!(store.get("k"), Err(StorageError::NotFound(_))));
        assert!(matches!(store.delete("k"), Err(StorageError::NotFound(_))));
        assert!(matches!(
            store.put("big", &vec![0; MAX_VALUE + 1]),
            Err(StorageError::TooLarge(_))
        ));
        assert!(matches!(store.get("../x"), Err(StorageError::BadKey(_))));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.join("store"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["empty".to_string()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
