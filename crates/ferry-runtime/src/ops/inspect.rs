//! `ferry inspect`: what a package holds; with `verify`, every chunk checked.

use std::path::{Path, PathBuf};

use ferry_package::Package;

use crate::package_meta::{self, PackageMeta};
use crate::RuntimeError;

/// One section of a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionRow {
    /// Its kind, e.g. `memory`.
    pub kind: String,
    /// Its size in bytes.
    pub size: u64,
    /// Chunks in all.
    pub chunks: usize,
    /// Chunks stored (the rest are zero).
    pub stored: usize,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Its SHA-256.
    pub digest: String,
}

/// Who signed a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureRow {
    /// The signer's key id (`ferry key gen` prints it).
    pub key_id: String,
    /// Whether the signature matches the package's table; `false`: it was
    /// changed after signing, or the signature came from another package.
    pub matches_table: bool,
}

/// What `ferry inspect` found.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The file.
    pub path: PathBuf,
    /// Format version (major, minor).
    pub format: (u16, u16),
    /// The file's size.
    pub file_size: u64,
    /// The sha256 of its section table: what a `#sha256=` pin names.
    pub table_sha256: String,
    /// Its signature, if it is signed.
    pub signature: Option<SignatureRow>,
    /// The VM's metadata, or why it cannot be read.
    pub meta: Result<PackageMeta, String>,
    /// The sections.
    pub sections: Vec<SectionRow>,
    /// With `verify`: the verifier's report.
    pub verified: Option<String>,
}

/// `ferry inspect`.
pub fn inspect(path: &Path, verify: bool) -> Result<Inspection, RuntimeError> {
    let pkg = Package::open(path)?;
    let sections = pkg
        .sections()
        .iter()
        .map(|s| {
            let stored: Vec<_> = s.chunks.iter().flatten().collect();
            SectionRow {
                kind: s.kind.to_string(),
                size: s.size,
                chunks: s.chunks.len(),
                stored: stored.len(),
                stored_bytes: stored.iter().map(|c| c.stored_len).sum(),
                digest: s.digest.clone(),
            }
        })
        .collect();
    let verified = if verify {
        Some(format!("{:?}", pkg.verify(&mut |_, _| {})?))
    } else {
        None
    };
    let (major, minor) = pkg.format_version();
    Ok(Inspection {
        path: path.to_path_buf(),
        format: (major, minor),
        file_size: pkg.file_size(),
        table_sha256: pkg.index().table_sha256(),
        signature: pkg.index().signature().map(|s| SignatureRow {
            key_id: s.key_id(),
            matches_table: s.matches_table,
        }),
        meta: package_meta::read(&pkg).map_err(|e| e.to_string()),
        sections,
        verified,
    })
}
