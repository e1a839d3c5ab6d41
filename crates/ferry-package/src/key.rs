//! Signing keys and their files (`ferry key gen`).
//!
//! A key pair is two small text files, typed and versioned so that a key of
//! another kind (or a `.pub` given where the `.key` belongs) is refused by
//! name rather than misread:
//!
//! ```text
//! PREFIX.key (0600)            PREFIX.pub
//! ferry-ed25519-key v1         ferry-ed25519-pub v1
//! <64 hex digits: the seed>    <64 hex digits: the public key>
//! ```
//!
//! Each is written to a temporary file beside its destination and renamed
//! into place, never over an existing file.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First line of a secret key file.
pub const SECRET_KEY_HEADER: &str = "ferry-ed25519-key v1";
/// First line of a public key file.
pub const PUBLIC_KEY_HEADER: &str = "ferry-ed25519-pub v1";

/// Reading, writing or generating a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `ferry key gen` would replace a key file.
    #[error("{0} exists already: key files are never replaced; pick another --out PREFIX or remove the old pair first")]
    Exists(PathBuf),
    /// The file is not a key of the kind asked for.
    #[error("{path} is not a {wanted} ({detail}): give the {hint} file that `ferry key gen --out PREFIX` wrote")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was expected: "ferry secret key" or "ferry public key".
        wanted: &'static str,
        /// Which file of the pair (`PREFIX.key` or `PREFIX.pub`).
        hint: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A secret key file others may read.
    #[error("{path} is readable by other users (mode {mode:04o}): run `chmod 600 {path}`; a signing key must be private")]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl KeyError {
    /// Whether the error is in what the user gave (a path, a file), as
    /// opposed to a failing system.
    pub fn is_bad_input(&self) -> bool {
        match self {
            KeyError::Io { source, .. } => matches!(
                source.kind(),
                ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::IsADirectory
            ),
            KeyError::Exists(_) | KeyError::Malformed { .. } | KeyError::NotPrivate { .. } => true,
        }
    }
}

/// An ed25519 public key: what `--trust` names and what a package's
/// signature carries.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// The key from its 32 bytes, if they are a valid ed25519 point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<PublicKey> {
        VerifyingKey::from_bytes(bytes).ok().map(PublicKey)
    }

    /// Its 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Its short id: the first 8 bytes of the sha256 of the key, in hex.
    /// Shown by `ferry key gen`, `ferry inspect` and in errors.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.as_bytes())[..8])
    }

    pub(crate) fn verifying(&self) -> &VerifyingKey {
        &self.0
    }

    /// Reads a public key file (`PREFIX.pub`).
    ///
    /// # Errors
    /// [`KeyError::Io`], or [`KeyError::Malformed`] for anything but a
    /// ferry public key file (a secret key file included).
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let malformed = |detail: String| KeyError::Malformed {
            path: path.to_path_buf(),
            wanted: "ferry public key",
            hint: "PREFIX.pub",
            detail,
        };
        let bytes =
            parse_key_file(&text, PUBLIC_KEY_HEADER, SECRET_KEY_HEADER).map_err(malformed)?;
        PublicKey::from_bytes(&bytes)
            .ok_or_else(|| malformed("the 32 bytes are not an ed25519 public key".into()))
    }

    fn file_text(&self) -> String {
        format!("{PUBLIC_KEY_HEADER}\n{}\n", hex::encode(self.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// As 64 hex digits: how a key travels inside a detached VM's spec.
impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.to_bytes()))
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&s, &mut bytes).map_err(serde::de::Error::custom)?;
        PublicKey::from_bytes(&bytes)
            .ok_or_else(|| serde::de::Error::custom("not an ed25519 public key"))
    }
}

/// An ed25519 secret key: what `ferry package --sign` signs with. Its
/// `Debug` output shows only the key id.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new random key.
    pub fn generate() -> SecretKey {
        SecretKey(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// The key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(seed))
    }

    /// Its public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub(crate) fn signing(&self) -> &SigningKey {
        &self.0
    }

    /// Reads a secret key file (`PREFIX.key`), which must not be readable
    /// by group or others.
    ///
    /// # Errors
    /// [`KeyError::Io`], [`KeyError::NotPrivate`], or
    /// [`KeyError::Malformed`] for anything but a ferry secret key file (a
    /// public key file included).
    pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o7777;
        let text = std::fs::read_to_string(path).map_err(io)?;
        let bytes =
            parse_key_file(&text, SECRET_KEY_HEADER, PUBLIC_KEY_HEADER).map_err(|detail| {
                KeyError::Malformed {
                    path: path.to_path_buf(),
                    wanted: "ferry secret key",
                    hint: "PREFIX.key",
                    detail,
                }
            })?;
        if mode & 0o077 != 0 {
            return Err(KeyError::NotPrivate {
                path: path.to_path_buf(),
                mode,
            });
        }
        Ok(SecretKey::from_seed(&bytes))
    }

    fn file_text(&self) -> String {
        format!("{SECRET_KEY_HEADER}\n{}\n", hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public_key().key_id())
    }
}

/// The files `ferry key gen` wrote.
#[derive(Debug, Clone)]
pub struct KeyPairFiles {
    /// `PREFIX.key`, mode 0600.
    pub secret: PathBuf,
    /// `PREFIX.pub`.
    pub public: PathBuf,
    /// The new key's id.
    pub key_id: String,
}

/// `PREFIX` with `.key` or `.pub` appended (not replacing an extension:
/// `keys/v1.2` gives `keys/v1.2.key`).
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Generates a key pair and writes `PREFIX.key` (0600) and `PREFIX.pub`
/// (0644), each through a temporary file beside it, renamed into place.
///
/// # Errors
/// [`KeyError::Exists`] if either file exists (nothing is written);
/// [`KeyError::Io`] if a write fails (what was written is removed).
pub fn generate_key_pair(prefix: &Path) -> Result<KeyPairFiles, KeyError> {
    let secret_path = with_suffix(prefix, ".key");
    let public_path = with_suffix(prefix, ".pub");
    for p in [&secret_path, &public_path] {
        if p.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(p.clone()));
        }
    }
    let key = SecretKey::generate();
    write_new(&secret_path, &key.file_text(), 0o600)?;
    if let Err(e) = write_new(&public_path, &key.public_key().file_text(), 0o644) {
        let _ = std::fs::remove_file(&secret_path);
        return Err(e);
    }
    Ok(KeyPairFiles {
        secret: secret_path,
        public: public_path,
        key_id: key.public_key().key_id(),
    })
}

/// Writes `text` to a new temporary file beside `dest` with `mode`, syncs
/// it and links it to `dest`, which must not exist (a link, unlike a
/// rename, never replaces a file that appeared meanwhile).
fn write_new(dest: &Path, text: &str, mode: u32) -> Result<(), KeyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    let mut tmp_name = dest.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        // The umask may have cleared bits of `mode`, never added any; make
        // it exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::hard_link(&tmp, dest).map_err(|source| {
            if source.kind() == ErrorKind::AlreadyExists {
                KeyError::Exists(dest.to_path_buf())
            } else {
                KeyError::Io {
                    path: dest.to_path_buf(),
                    source,
                }
            }
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// The 32 bytes of a key file whose first line is `header`; `other` is the
/// header of the other half of a pair, named in the error when it is found
/// instead.
fn parse_key_file(text: &str, header: &str, other: &str) -> Result<[u8; 32], String> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("").trim_end();
    if first == other {
        return Err(format!(
            "it starts with `{other}`: the other file of the pair"
        ));
    }
    if first != header {
        return Err(format!("it does not start with `{header}`"));
    }
    let body = lines.next().unwrap_or("").trim();
    if lines.any(|l| !l.trim().is_empty()) {
        return Err("it has more than two lines".into());
    }
    let mut bytes = [0u8; 32];
    if body.len() != 64 || hex::decode_to_slice(body, &mut bytes).is_err() {
        return Err("its second line is not 64 hex digits".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_pair_loads_back_and_the_secret_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("release");
        let files = generate_key_pair(&prefix).unwrap();
        assert_eq!(files.secret, dir.path().join("release.key"));
        assert_eq!(files.public, dir.path().join("release.pub"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.secret), 0o600);
        assert_eq!(mode(&files.public), 0o644);
        let secret = SecretKey::load(&files.secret).unwrap();
        let public = PublicKey::load(&files.public).unwrap();
        assert_eq!(secret.public_key(), public);
        assert_eq!(public.key_id(), files.key_id);
        assert_eq!(files.key_id.len(), 16);
        // No temporary file is left beside them.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let text = std::fs::read_to_string(&files.secret).unwrap();
        assert!(text.starts_with("ferry-ed25519-key v1\n"), "{text}");
        assert!(!format!("{secret:?}").contains(&text.lines().nth(1).unwrap()[..16]));
    }

    #[test]
    fn key_files_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("k");
        std::fs::write(dir.path().join("k.pub"), "mine").unwrap();
        let err = generate_key_pair(&prefix).unwrap_err();
        assert!(matches!(err, KeyError::Exists(_)), "{err}");
        assert!(!dir.path().join("k.key").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("k.pub")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn the_wrong_half_or_a_readable_secret_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate_key_pair(&dir.path().join("k")).unwrap();
        let err = SecretKey::load(&files.public).unwrap_err().to_string();
        assert!(err.contains("the other file of the pair"), "{err}");
        let err = PublicKey::load(&files.secret).unwrap_err().to_string();
        assert!(err.contains("give the PREFIX.pub file"), "{err}");
        std::fs::set_permissions(&files.secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load(&files.secret).unwrap_err();
        assert!(
            matches!(err, KeyError::NotPrivate { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::write(&files.public, "ferry-ed25519-pub v1\nxyz\n").unwrap();
        let err = PublicKey::load(&files.public).unwrap_err().to_string();
        assert!(err.contains("not 64 hex digits"), "{err}");
    }

    #[test]
    fn public_keys_round_trip_through_json() {
        let k = SecretKey::generate().public_key();
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), k);
        assert!(serde_json::from_str::<PublicKey>("\"00\"").is_err());
    }
}
