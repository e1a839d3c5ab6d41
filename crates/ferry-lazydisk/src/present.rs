//! The present-map: which chunks of a lazy disk's file hold the disk's
//! bytes, kept in `<file>.present` so that a restarted peer does not fetch
//! them again.
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `FERRYLZP` |
//! | 8 | 4 | version, 1 |
//! | 12 | 4 | length `n` of the digest |
//! | 16 | 8 | disk size |
//! | 24 | 8 | chunk size |
//! | 32 | 8 | chunk count |
//! | 40 | n | the source's digest (UTF-8) |
//! | 40+n | ⌈count/8⌉ | one bit per chunk, chunk `i` in bit `i % 8` of byte `i / 8` |
//! | … | 32 | sha256 of everything before |
//!
//! It is replaced whole (write a temporary file, fsync, rename, fsync the
//! directory), and only after the disk file was synced, so a bit is never
//! set on disk before the chunk's bytes are.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"FERRYLZP";
const VERSION: u32 = 1;
const FIXED: usize = 40;
/// Longest digest accepted (a sha256 in hex is 64).
const MAX_DIGEST: usize = 1024;

/// What a present-map belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub size: u64,
    pub chunk_size: u64,
    pub count: u64,
    pub digest: String,
}

/// Why a present-map could not be used.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    Corrupt(String),
    Other(String),
}

/// `<disk>.present`.
pub(crate) fn map_path(disk: &Path) -> PathBuf {
    let mut p = OsString::from(disk.as_os_str());
    p.push(".present");
    PathBuf::from(p)
}

/// Encodes `present` for `id`.
pub(crate) fn encode(id: &Identity, present: &[bool]) -> Vec<u8> {
    debug_assert_eq!(present.len() as u64, id.count);
    let mut out = Vec::with_capacity(FIXED + id.digest.len() + present.len() / 8 + 33);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(id.digest.len() as u32).to_le_bytes());
    out.extend_from_slice(&id.size.to_le_bytes());
    out.extend_from_slice(&id.chunk_size.to_le_bytes());
    out.extend_from_slice(&id.count.to_le_bytes());
    out.extend_from_slice(id.digest.as_bytes());
    let mut bits = vec![0u8; present.len().div_ceil(8)];
    for (i, _) in present.iter().enumerate().filter(|(_, p)| **p) {
        bits[i / 8] |= 1 << (i % 8);
    }
    out.extend_from_slice(&bits);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Decodes a present-map and checks that it belongs to `id`.
pub(crate) fn decode(bytes: &[u8], id: &Identity) -> Result<Vec<bool>, ReadError> {
    let corrupt = |d: &str| ReadError::Corrupt(d.to_string());
    if bytes.len() < FIXED + 32 || &bytes[..8] != MAGIC {
        return Err(corrupt("not a lazy disk's present-map"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(corrupt("its checksum does not match"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(corrupt(&format!(
            "version {version}, this ferry reads version {VERSION}"
        )));
    }
    let n = u32_at(12) as usize;
    let (size, chunk_size, count) = (u64_at(16), u64_at(24), u64_at(32));
    if n > MAX_DIGEST || count > (body.len() as u64) * 8 {
        return Err(corrupt("its lengths are impossible"));
    }
    let bits_len = count.div_ceil(8) as usize;
    if body.len() != FIXED + n + bits_len {
        return Err(corrupt("its length does not match its chunk count"));
    }
    let digest = std::str::from_utf8(&body[FIXED..FIXED + n])
        .map_err(|_| corrupt("its digest is not UTF-8"))?;
    let found = Identity {
        size,
        chunk_size,
        count,
        digest: digest.to_string(),
    };
    if found != *id {
        return Err(ReadError::Other(describe_difference(&found, id)));
    }
    let bits = &body[FIXED + n..];
    Ok((0..count as usize)
        .map(|i| bits[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

fn describe_difference(found: &Identity, want: &Identity) -> String {
    if found.digest != want.digest {
        format!(
            "its digest is {}, the source's is {}",
            found.digest, want.digest
        )
    } else {
        format!(
            "it has {} bytes in {} chunks of {}, the source {} bytes in {} chunks of {}",
            found.size, found.count, found.chunk_size, want.size, want.count, want.chunk_size
        )
    }
}

/// Reads the present-map at `path`; `Ok(None)` if there is none.
pub(crate) fn read(path: &Path, id: &Identity) -> Result<Option<Vec<bool>>, ReadError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let limit = (FIXED + MAX_DIGEST + 32) as u64 + id.count.div_ceil(8);
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::Corrupt("it is too long".into()));
    }
    decode(&bytes, id).map(Some)
}

/// Replaces the present-map at `path` atomically and durably.
pub(crate) fn write(path: &Path, id: &Identity, present: &[bool]) -> io::Result<()> {
    let bytes = encode(id, present);
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(count: u64) -> Identity {
        Identity {
            size: (count * 4096).saturating_sub(100),
            chunk_size: 4096,
            count,
            digest: "ab".repeat(32),
        }
    }

    #[test]
    fn round_trip() {
        for count in [0u64, 1, 7, 8, 9, 1000] {
            let present: Vec<bool> = (0..count).map(|i| i % 3 == 0 || i == count - 1).collect();
            let bytes = encode(&id(count), &present);
            assert_eq!(decode(&bytes, &id(count)).unwrap(), present, "{count}");
        }
    }

    #[test]
    fn damage_and_other_disks_are_refused() {
        let present = vec![true, false, true];
        let bytes = encode(&id(3), &present);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(
                matches!(decode(&b, &id(3)), Err(ReadError::Corrupt(_))),
                "byte {i}"
            );
        }
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], &id(3)),
            Err(ReadError::Corrupt(_))
        ));
        let mut other = id(3);
        other.digest = "cd".repeat(32);
        let Err(ReadError::Other(msg)) = decode(&bytes, &other) else {
            panic!("another digest was accepted");
        };
        assert!(msg.contains("digest"), "{msg}");
        assert!(matches!(decode(&bytes, &id(4)), Err(ReadError::Other(_))));
    }

    #[test]
    fn files() {
        let dir = tempfile::tempdir().unwrap();
        let path = map_path(&dir.path().join("disk.raw"));
        assert_eq!(path.file_name().unwrap(), "disk.raw.present");
        assert!(read(&path, &id(3)).unwrap().is_none());
        write(&path, &id(3), &[true, false, true]).unwrap();
        assert_eq!(
            read(&path, &id(3)).unwrap().unwrap(),
            vec![true, false, true]
        );
        write(&path, &id(3), &[true, true, true]).unwrap();
        assert_eq!(read(&path, &id(3)).unwrap().unwrap(), vec![true; 3]);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
