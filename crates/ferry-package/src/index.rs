//! What a package says about itself, decoded from its header and section
//! table bytes alone.
//!
//! Kept apart from the file so that every reader checks a package the same
//! way, whether its bytes come from a local file ([`Package`](crate::Package))
//! or from HTTP range requests (a registry client): the reader fetches the
//! header, asks [`PackageIndex::table_range`] where the table is, fetches it,
//! and [`PackageIndex::from_parts`] does every check of `docs/package-format.md`
//! ("What a reader checks").

use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::PackageError;
use crate::header::Header;
use crate::sign::{self, PackageSignature, SIGNATURE_BLOCK_LEN};
use crate::table::{self, SectionInfo, SectionKind, Table};

/// The checked header and section table of a package: its version, metadata
/// and chunk map, without the chunks. Chunks are checked when read, with
/// [`SectionInfo::decode_chunk`].
#[derive(Debug, Clone)]
pub struct PackageIndex {
    source: PathBuf,
    file_len: u64,
    version: (u16, u16),
    table_offset: u64,
    table_sha256: [u8; 32],
    metadata: serde_json::Value,
    sections: Vec<SectionInfo>,
    signature: Option<PackageSignature>,
}

impl PackageIndex {
    /// Where the section table lies in the package file, from the header.
    ///
    /// # Arguments
    /// - `source` names the package in errors (a path, or a URL for a remote
    ///   package).
    /// - `header` is the start of the file: [`HEADER_SIZE`](crate::HEADER_SIZE)
    ///   bytes, or the whole file when it is shorter.
    /// - `file_len` is the length of the whole file.
    ///
    /// # Errors
    /// [`PackageError::NotAPackage`], [`PackageError::Truncated`],
    /// [`PackageError::UnsupportedVersion`] or [`PackageError::HeaderCorrupt`].
    pub fn table_range(
        source: &Path,
        header: &[u8],
        file_len: u64,
    ) -> Result<Range<u64>, PackageError> {
        let h = Header::decode(source, header, file_len)?;
        // The header checks ruled out an overflow.
        Ok(h.table_offset..h.table_offset + h.table_len)
    }

    /// Checks a package's header and section table and decodes them.
    ///
    /// `table` is the bytes at [`table_range`](Self::table_range); the other
    /// arguments are as there.
    ///
    /// # Errors
    /// As [`table_range`](Self::table_range), and
    /// [`PackageError::TableCorrupt`].
    pub fn from_parts(
        source: &Path,
        header: &[u8],
        table: &[u8],
        file_len: u64,
    ) -> Result<PackageIndex, PackageError> {
        let h = Header::decode(source, header, file_len)?;
        let corrupt = |detail: String| PackageError::TableCorrupt {
            path: source.to_path_buf(),
            detail,
        };
        if table.len() as u64 != h.table_len {
            return Err(corrupt(format!(
                "{} bytes were read where the header says {}",
                table.len(),
                h.table_len
            )));
        }
        if Sha256::digest(table)[..] != h.table_sha256 {
            return Err(corrupt(
                "its checksum does not match the one in the header".into(),
            ));
        }
        let parsed: Table =
            serde_json::from_slice(table).map_err(|e| corrupt(format!("bad JSON: {e}")))?;
        table::validate(&parsed, h.table_offset).map_err(corrupt)?;
        Ok(PackageIndex {
            source: source.to_path_buf(),
            file_len,
            version: (h.major, h.minor),
            table_offset: h.table_offset,
            table_sha256: h.table_sha256,
            metadata: parsed.metadata,
            sections: parsed.sections,
            signature: None,
        })
    }

    /// Where the package's signature block would lie: the
    /// [`SIGNATURE_BLOCK_LEN`] bytes just before the table, when they are
    /// in the data area and no chunk refers to them. `None`: the package
    /// cannot hold a signature (it is unsigned).
    pub fn signature_range(&self) -> Option<Range<u64>> {
        let start = self.table_offset.checked_sub(SIGNATURE_BLOCK_LEN)?;
        if start < crate::HEADER_SIZE {
            return None;
        }
        let overlaps = self
            .sections
            .iter()
            .flat_map(|s| s.chunks.iter().flatten())
            .any(|c| {
                // `from_parts` checked that no chunk ends past the table.
                c.offset < self.table_offset && c.offset + c.stored_len > start
            });
        (!overlaps).then_some(start..self.table_offset)
    }

    /// Reads the bytes at [`signature_range`](Self::signature_range) as a
    /// signature block and checks the signature against this table. Bytes
    /// that are not a signature block this version reads leave the
    /// package unsigned.
    pub fn with_signature_block(mut self, block: &[u8]) -> PackageIndex {
        self.signature = sign::decode_block(block, &self.table_sha256);
        self
    }

    /// The package's signature, if it has one (read by
    /// [`with_signature_block`](Self::with_signature_block); a local
    /// [`Package`](crate::Package) reads it on open). Whether the signer is
    /// trusted is [`TrustedKeys::check`](crate::TrustedKeys::check)'s
    /// question.
    pub fn signature(&self) -> Option<&PackageSignature> {
        self.signature.as_ref()
    }

    /// What the package was read from (as given to [`from_parts`](Self::from_parts)).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Length of the package file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The package's format version (major, minor).
    pub fn format_version(&self) -> (u16, u16) {
        self.version
    }

    /// sha256 of the section table, lowercase hex. The table holds the sha256
    /// of every chunk and the header holds this, so it identifies the whole
    /// package: a registry uses it as the package's `ETag`.
    pub fn table_sha256(&self) -> String {
        hex::encode(self.table_sha256)
    }

    /// The metadata the writer recorded, as stored: read it with
    /// [`VmMeta::from_json`](crate::VmMeta::from_json).
    pub fn metadata(&self) -> &serde_json::Value {
        &self.metadata
    }

    /// All sections, in the order they were written.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.sections
    }

    /// The section of kind `kind`.
    ///
    /// # Errors
    /// [`PackageError::MissingSection`] if the package has none.
    pub fn section(&self, kind: SectionKind) -> Result<&SectionInfo, PackageError> {
        self.sections
            .iter()
            .find(|s| s.kind == kind)
            .ok_or_else(|| PackageError::MissingSection {
                path: self.source.clone(),
                kind,
            })
    }
}
