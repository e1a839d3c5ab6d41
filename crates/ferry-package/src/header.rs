//! The fixed 4096-byte header at offset 0.
//!
//! Bytes 0..12 (magic, major, minor) keep their meaning in every format
//! version, so any ferry can tell which version a package has even when it
//! cannot read the rest. The remaining fields are those of format 1.x.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::PackageError;
use crate::{FORMAT_MAJOR, FORMAT_MINOR, HEADER_SIZE, MAGIC, MAX_TABLE_LEN};

/// Offsets of the header fields (format 1.x).
const OFF_MAJOR: usize = 8;
const OFF_MINOR: usize = 10;
const OFF_FLAGS: usize = 12;
const OFF_TABLE_OFFSET: usize = 16;
const OFF_TABLE_LEN: usize = 24;
const OFF_TABLE_SHA256: usize = 32;
const OFF_HEADER_SHA256: usize = 64;
/// End of the checksummed-and-checksum part; zeros follow up to 4096.
const END_FIELDS: usize = 96;

/// The decoded header of a format 1.x package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub major: u16,
    pub minor: u16,
    pub flags: u32,
    pub table_offset: u64,
    pub table_len: u64,
    pub table_sha256: [u8; 32],
}

impl Header {
    /// The header's bytes, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[..8].copy_from_slice(MAGIC);
        b[OFF_MAJOR..OFF_MAJOR + 2].copy_from_slice(&self.major.to_le_bytes());
        b[OFF_MINOR..OFF_MINOR + 2].copy_from_slice(&self.minor.to_le_bytes());
        b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        b[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8].copy_from_slice(&self.table_offset.to_le_bytes());
        b[OFF_TABLE_LEN..OFF_TABLE_LEN + 8].copy_from_slice(&self.table_len.to_le_bytes());
        b[OFF_TABLE_SHA256..OFF_TABLE_SHA256 + 32].copy_from_slice(&self.table_sha256);
        let sum = Sha256::digest(&b[..OFF_HEADER_SHA256]);
        b[OFF_HEADER_SHA256..END_FIELDS].copy_from_slice(&sum);
        b
    }

    /// Decodes and checks a header.
    ///
    /// `bytes` is the start of the file (up to [`HEADER_SIZE`] bytes; fewer
    /// when the file is shorter) and `file_len` the file's full length.
    /// Checks, in order: magic, version, length, checksum, reserved bytes,
    /// flags, and where the table lies.
    pub fn decode(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header, PackageError> {
        let truncated = |detail: String| PackageError::Truncated {
            path: path.to_path_buf(),
            detail,
        };
        let corrupt = |detail: String| PackageError::HeaderCorrupt {
            path: path.to_path_buf(),
            detail,
        };

        // Magic: a file that is a (possibly empty) prefix of it was cut short.
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(PackageError::NotAPackage(path.to_path_buf()));
        }
        if bytes.len() < OFF_FLAGS {
            return Err(truncated(format!(
                "the file is {file_len} bytes, shorter than the {HEADER_SIZE}-byte header"
            )));
        }

        let major = u16::from_le_bytes([bytes[OFF_MAJOR], bytes[OFF_MAJOR + 1]]);
        let minor = u16::from_le_bytes([bytes[OFF_MINOR], bytes[OFF_MINOR + 1]]);
        if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
            return Err(PackageError::UnsupportedVersion {
                path: path.to_path_buf(),
                major,
                minor,
            });
        }

        if (bytes.len() as u64) < HEADER_SIZE {
            return Err(truncated(format!(
                "the file is {file_len} bytes, shorter than the {HEADER_SIZE}-byte header"
            )));
        }
        let b = &bytes[..HEADER_SIZE as usize];

        let sum = Sha256::digest(&b[..OFF_HEADER_SHA256]);
        if sum[..] != b[OFF_HEADER_SHA256..END_FIELDS] {
            return Err(corrupt("its checksum does not match".into()));
        }
        if b[END_FIELDS..].iter().any(|&x| x != 0) {
            return Err(corrupt("reserved bytes are not zero".into()));
        }

        let flags = u32::from_le_bytes(b[OFF_FLAGS..OFF_FLAGS + 4].try_into().expect("4 bytes"));
        if flags != 0 {
            return Err(corrupt(format!("unknown flags {flags:#x}")));
        }
        let table_offset = u64::from_le_bytes(
            b[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8]
                .try_into()
                .expect("8 bytes"),
        );
        let table_len = u64::from_le_bytes(
            b[OFF_TABLE_LEN..OFF_TABLE_LEN + 8]
                .try_into()
                .expect("8 bytes"),
        );
        let table_sha256: [u8; 32] = b[OFF_TABLE_SHA256..OFF_TABLE_SHA256 + 32]
            .try_into()
            .expect("32 bytes");

        if table_offset < HEADER_SIZE {
            return Err(corrupt(format!(
                "the section table offset {table_offset} lies inside the header"
            )));
        }
        if table_len == 0 || table_len > MAX_TABLE_LEN {
            return Err(corrupt(format!(
                "the section table length {table_len} is outside 1..={MAX_TABLE_LEN}"
            )));
        }
        let Some(table_end) = table_offset.checked_add(table_len) else {
            return Err(corrupt("the section table's end overflows".into()));
        };
        if table_end > file_len {
            return Err(truncated(format!(
                "the file is {file_len} bytes, but its section table ends at byte {table_end}"
            )));
        }
        if table_end < file_len {
            return Err(corrupt(format!(
                "the file is {file_len} bytes, {} more than the end of its section table: \
                 something was appended to it",
                file_len - table_end
            )));
        }

        Ok(Header {
            major,
            minor,
            flags,
            table_offset,
            table_len,
            table_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            flags: 0,
            table_offset: HEADER_SIZE + 10,
            table_len: 20,
            table_sha256: [7; 32],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(b.len() as u64, HEADER_SIZE);
        assert_eq!(&b[..8], MAGIC);
        assert_eq!(
            Header::decode(Path::new("p"), &b, HEADER_SIZE + 30).unwrap(),
            h
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let b = sample().encode();
        let e = Header::decode(Path::new("p"), &b, HEADER_SIZE + 31).unwrap_err();
        assert!(matches!(e, PackageError::HeaderCorrupt { .. }), "{e}");
    }

    #[test]
    fn short_files() {
        let p = Path::new("p");
        for len in 0..8 {
            let e = Header::decode(p, &MAGIC[..len], len as u64).unwrap_err();
            assert!(matches!(e, PackageError::Truncated { .. }), "{len}: {e}");
        }
        let e = Header::decode(p, b"FERRYPKX", 8).unwrap_err();
        assert!(matches!(e, PackageError::NotAPackage(_)), "{e}");
        let e = Header::decode(p, b"F", 1).unwrap_err();
        assert!(matches!(e, PackageError::Truncated { .. }), "{e}");
        let e = Header::decode(p, b"X", 1).unwrap_err();
        assert!(matches!(e, PackageError::NotAPackage(_)), "{e}");
    }
}
