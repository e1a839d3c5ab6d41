//! The section table: what each section holds and where its chunks are.
//!
//! The table is JSON so that tools other than ferry (a registry, `jq`) can read
//! it; it is checksummed by the header and checked field by field on open, so
//! nothing in it is trusted before [`validate`] passed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chunk;
use crate::error::PackageError;
use crate::{HEADER_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// What a section holds. Each appears at most once in a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SectionKind {
    /// The VM's configuration (JSON written by the runtime).
    Config,
    /// Saved device and CPU state.
    DeviceState,
    /// Guest memory.
    Memory,
    /// The guest kernel.
    Kernel,
    /// The guest initramfs.
    Initramfs,
    /// The guest's disk image.
    Disk,
}

impl SectionKind {
    /// Every kind, in the order a writer usually adds them.
    pub const ALL: [SectionKind; 6] = [
        SectionKind::Config,
        SectionKind::DeviceState,
        SectionKind::Memory,
        SectionKind::Kernel,
        SectionKind::Initramfs,
        SectionKind::Disk,
    ];

    /// The kind's name as written in the table (`device-state`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Config => "config",
            SectionKind::DeviceState => "device-state",
            SectionKind::Memory => "memory",
            SectionKind::Kernel => "kernel",
            SectionKind::Initramfs => "initramfs",
            SectionKind::Disk => "disk",
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SectionKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SectionKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = SectionKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown section '{s}': sections are {}", names.join(", "))
            })
    }
}

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is: the stored bytes are the chunk.
    None,
    /// One or more zstd frames that decompress to the chunk.
    Zstd,
}

/// Where one stored (not all-zero) chunk is in the package file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkEntry {
    /// Offset of the stored bytes from the start of the file.
    pub offset: u64,
    /// Number of stored bytes (after compression).
    pub stored_len: u64,
    /// How the bytes are stored.
    pub compression: Compression,
    /// sha256 of the uncompressed chunk, lowercase hex.
    pub sha256: String,
}

/// One section: its size, chunking, content digest and chunk map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionInfo {
    /// What the section holds.
    pub kind: SectionKind,
    /// Uncompressed size in bytes.
    pub size: u64,
    /// Size of every chunk but the last (which may be shorter).
    pub chunk_size: u64,
    /// sha256 over the concatenated 32-byte sha256s of all chunks in order
    /// (an all-zero chunk counts as the sha256 of that many zero bytes),
    /// lowercase hex. Identifies the content; usable as a cache key.
    pub digest: String,
    /// One entry per chunk; `None` for an all-zero chunk, which is not stored.
    pub chunks: Vec<Option<ChunkEntry>>,
}

impl SectionInfo {
    /// Number of chunks, stored or zero.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Uncompressed length of chunk `index`, or `None` past the end.
    pub fn chunk_len(&self, index: usize) -> Option<u64> {
        let start = (index as u64).checked_mul(self.chunk_size)?;
        if start >= self.size {
            return None;
        }
        Some((self.size - start).min(self.chunk_size))
    }

    /// Bytes this section occupies in the package file.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().flatten().map(|c| c.stored_len).sum()
    }

    /// Number of all-zero chunks (not stored).
    pub fn zero_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_none()).count()
    }

    /// Number of stored chunks.
    pub fn stored_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
    }

    /// Decodes and verifies chunk `index` from its stored bytes alone: the
    /// `stored_len` bytes at `offset` in the package file, however they were
    /// fetched (for instance by an HTTP range request). For an all-zero chunk
    /// `stored` is ignored (pass an empty slice) and zeros are returned.
    ///
    /// # Errors
    /// [`PackageError::ChunkOutOfRange`] for an index past the end;
    /// [`PackageError::ChunkCorrupt`] when the bytes have the wrong length,
    /// do not decompress to exactly the chunk's length, or do not match its
    /// sha256.
    pub fn decode_chunk(&self, index: usize, stored: &[u8]) -> Result<Vec<u8>, PackageError> {
        let out_of_range = || PackageError::ChunkOutOfRange {
            section: self.kind,
            index,
            count: self.chunks.len(),
        };
        let entry = self.chunks.get(index).ok_or_else(out_of_range)?;
        let len = self.chunk_len(index).ok_or_else(out_of_range)?;
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let Some(entry) = entry else {
            return Ok(vec![0; len]);
        };
        let corrupt = || PackageError::ChunkCorrupt {
            section: self.kind,
            index,
            offset: entry.offset,
        };
        if stored.len() as u64 != entry.stored_len {
            return Err(corrupt());
        }
        let data = match entry.compression {
            Compression::None => stored.to_vec(),
            Compression::Zstd => chunk::decompress(stored, len).ok_or_else(corrupt)?,
        };
        if data.len() != len || hex::encode(chunk::sha256(&data)) != entry.sha256 {
            return Err(corrupt());
        }
        Ok(data)
    }
}

/// The whole table as stored in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Table {
    pub metadata: serde_json::Value,
    pub sections: Vec<SectionInfo>,
}

/// Computes a section's digest from its chunk sha256s (`None` for a zero
/// chunk, whose length follows from `size` and `chunk_size`).
pub(crate) fn section_digest<'a>(
    size: u64,
    chunk_size: u64,
    shas: impl IntoIterator<Item = Option<&'a [u8; 32]>>,
) -> String {
    let mut zero_full: Option<[u8; 32]> = None;
    let mut h = Sha256::new();
    let mut start = 0u64;
    for sha in shas {
        let len = (size - start).min(chunk_size);
        match sha {
            Some(s) => h.update(s),
            None if len == chunk_size => {
                h.update(zero_full.get_or_insert_with(|| chunk::zero_sha256(chunk_size)))
            }
            None => h.update(chunk::zero_sha256(len)),
        }
        start += len;
    }
    hex::encode(h.finalize())
}

/// Decodes a lowercase-hex sha256.
fn parse_sha(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Checks a chunk size a writer was given or a table holds.
pub(crate) fn chunk_size_ok(chunk_size: u64) -> bool {
    (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        && chunk_size.is_multiple_of(MIN_CHUNK_SIZE)
}

/// Checks everything in a parsed table against itself and the file: stored
/// chunks lie between the header and the table (`data_end`) without
/// overlapping, counts and lengths agree with sizes, checksums are well
/// formed and digests match. Returns what is wrong.
pub(crate) fn validate(table: &Table, data_end: u64) -> Result<(), String> {
    let mut seen = Vec::new();
    let mut extents = Vec::new();
    for s in &table.sections {
        let kind = s.kind;
        if seen.contains(&kind) {
            return Err(format!("section {kind} appears twice"));
        }
        seen.push(kind);
        if !chunk_size_ok(s.chunk_size) {
            return Err(format!(
                "section {kind}: chunk size {} is not a multiple of 4096 from 4 KiB to 64 MiB",
                s.chunk_size
            ));
        }
        let count = s.size.div_ceil(s.chunk_size);
        if count != s.chunks.len() as u64 {
            return Err(format!(
                "section {kind}: {} bytes in chunks of {} make {count} chunks, but {} are listed",
                s.size,
                s.chunk_size,
                s.chunks.len()
            ));
        }
        let mut shas = Vec::with_capacity(s.chunks.len());
        for (i, c) in s.chunks.iter().enumerate() {
            let Some(c) = c else {
                shas.push(None);
                continue;
            };
            let len = s.chunk_len(i).expect("count checked above");
            let end = c.offset.checked_add(c.stored_len);
            if c.offset < HEADER_SIZE || end.is_none_or(|e| e > data_end) {
                return Err(format!(
                    "section {kind}: chunk {i} (offset {}, {} bytes) lies outside the data area {HEADER_SIZE}..{data_end}",
                    c.offset, c.stored_len
                ));
            }
            let len_ok = match c.compression {
                Compression::None => c.stored_len == len,
                Compression::Zstd => (1..=len).contains(&c.stored_len),
            };
            if !len_ok {
                return Err(format!(
                    "section {kind}: chunk {i} has {} stored bytes for {len} bytes of data",
                    c.stored_len
                ));
            }
            let Some(sha) = parse_sha(&c.sha256) else {
                return Err(format!("section {kind}: chunk {i} has a malformed sha256"));
            };
            shas.push(Some(sha));
            extents.push((c.offset, c.stored_len, kind, i));
        }
        if parse_sha(&s.digest).is_none() {
            return Err(format!("section {kind}: malformed digest"));
        }
        let digest = section_digest(s.size, s.chunk_size, shas.iter().map(Option::as_ref));
        if digest != s.digest {
            return Err(format!(
                "section {kind}: the digest does not match the chunk checksums"
            ));
        }
    }
    extents.sort_unstable();
    for pair in extents.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.0 + a.1 > b.0 {
            return Err(format!(
                "chunk {} of section {} overlaps chunk {} of section {}",
                a.3, a.2, b.3, b.2
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in SectionKind::ALL {
            assert_eq!(k.name().parse::<SectionKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.name())
            );
            assert_eq!(k.to_string(), k.name());
        }
        assert!("memory2".parse::<SectionKind>().is_err());
    }

    #[test]
    fn chunk_lengths() {
        let s = SectionInfo {
            kind: SectionKind::Memory,
            size: 10_000,
            chunk_size: 4096,
            digest: String::new(),
            chunks: vec![None, None, None],
        };
        assert_eq!(s.chunk_len(0), Some(4096));
        assert_eq!(s.chunk_len(2), Some(10_000 - 8192));
        assert_eq!(s.chunk_len(3), None);
        assert_eq!(s.chunk_len(usize::MAX), None);
    }

    #[test]
    fn digest_of_zero_chunks_equals_digest_of_their_hashes() {
        let full = chunk::sha256(&[0u8; 4096]);
        let short = chunk::sha256(&[0u8; 100]);
        assert_eq!(
            section_digest(4196, 4096, [None, None]),
            section_digest(4196, 4096, [Some(&full), Some(&short)])
        );
    }

    #[test]
    fn malformed_shas_are_refused() {
        assert!(parse_sha(&"a".repeat(64)).is_some());
        assert!(parse_sha(&"A".repeat(64)).is_none());
        assert!(parse_sha(&"a".repeat(63)).is_none());
        assert!(parse_sha(&"g".repeat(64)).is_none());
        assert!(parse_sha("ü").is_none());
    }
}
