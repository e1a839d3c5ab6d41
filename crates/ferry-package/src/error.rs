use std::path::PathBuf;

use crate::table::SectionKind;
use crate::{FORMAT_MAJOR, FORMAT_MINOR};

/// Everything that can go wrong writing, opening or reading a package. Each
/// message names the cause and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A write failed because the file system is full.
    #[error("{path}: no space left on the device: free some space (or write the package elsewhere) and retry")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// The file ends before the data its header or table describes.
    #[error("{path} is truncated ({detail}): the copy is incomplete; fetch it again or rebuild it with ferry package")]
    Truncated {
        /// The package file.
        path: PathBuf,
        /// What is missing.
        detail: String,
    },
    /// The file does not start with the package magic.
    #[error("{0} is not a ferry package (it does not start with FERRYPKG): check the path")]
    NotAPackage(PathBuf),
    /// The package uses a format version this ferry cannot read.
    #[error(
        "{path}: package format {major}.{minor} is not supported by this ferry (reads {}): {}",
        supported_versions(),
        version_fix(*.major, *.minor)
    )]
    UnsupportedVersion {
        /// The package file.
        path: PathBuf,
        /// The package's format major version.
        major: u16,
        /// The package's format minor version.
        minor: u16,
    },
    /// The fixed header fails its checksum or holds impossible values.
    #[error("{path}: the package header is corrupt ({detail}): the package is damaged; fetch or rebuild it")]
    HeaderCorrupt {
        /// The package file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The section table fails its checksum, does not parse or is inconsistent.
    #[error("{path}: the section table is corrupt ({detail}): the package is damaged; fetch or rebuild it")]
    TableCorrupt {
        /// The package file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A chunk does not decompress or does not match its sha256.
    #[error("chunk {index} of section {section} (file offset {offset}) is corrupt: the package is damaged; fetch or rebuild it")]
    ChunkCorrupt {
        /// The section holding the chunk.
        section: SectionKind,
        /// The chunk's index within the section.
        index: usize,
        /// Where the chunk's stored bytes start in the package file.
        offset: u64,
    },
    /// The package lacks a section the caller needs.
    #[error("{path}: the package has no {kind} section: it is incomplete; rebuild it with ferry package")]
    MissingSection {
        /// The package file.
        path: PathBuf,
        /// The section asked for.
        kind: SectionKind,
    },
    /// A chunk index past the end of its section was asked for.
    #[error("section {section} has {count} chunks: there is no chunk {index}")]
    ChunkOutOfRange {
        /// The section.
        section: SectionKind,
        /// The index asked for.
        index: usize,
        /// How many chunks the section has.
        count: usize,
    },
    /// A section was added twice to one package.
    #[error("section {0} was already added: a package holds each section once")]
    DuplicateSection(SectionKind),
    /// The chunk size is outside what the format allows.
    #[error("chunk size {0} is not supported: use a multiple of 4096 from 4 KiB to 64 MiB (the default is 2 MiB)")]
    InvalidChunkSize(u64),
    /// The section table would exceed the format's size cap.
    #[error("the section table would be {size} bytes, more than the limit of {limit}: use a larger chunk size")]
    TableTooLarge {
        /// The table's size.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// A section is too large to be read into memory.
    #[error("section {kind} is {size} bytes, too large to read into memory: extract it to a file instead")]
    SectionTooLarge {
        /// The section.
        kind: SectionKind,
        /// Its uncompressed size.
        size: u64,
    },
    /// The package (or migration offer) holds metadata, but not a VM's that
    /// this version can read: another program's package, or one from a ferry
    /// whose metadata lacks a field this one needs.
    #[error("{package} is a package but not a ferry VM package this version understands ({detail}): make it again with 'ferry package'")]
    NotAVmPackage {
        /// Where the metadata came from (a path or a URL). Not named
        /// `source`: thiserror takes a field of that name for the cause.
        package: String,
        /// What is missing or wrong (names the field).
        detail: String,
    },
    /// `--trust` asks for a signature and the package has none (or one
    /// this version cannot read).
    #[error("package {package} is not signed by a trusted key (it carries no signature): sign it with `ferry package --sign KEY`, or drop --trust")]
    NotSigned {
        /// The package (a path or a URL).
        package: String,
    },
    /// The package is signed, by a key no `--trust` names.
    #[error("package {package} is not signed by a trusted key (it is signed by key {key_id}): pass --trust with that key's .pub file if you trust it, or sign the package with `ferry package --sign KEY` of a trusted key")]
    UntrustedSigner {
        /// The package.
        package: String,
        /// The signer's key id.
        key_id: String,
    },
    /// The signature is by a trusted key but not of this package's table:
    /// the package was changed (re-packed) after it was signed, or its
    /// signature was taken from another package.
    #[error("package {package} is not signed by a trusted key (its signature by key {key_id} does not match its content: it was changed or re-packed after signing): fetch the original, or sign it again with `ferry package --sign KEY`")]
    SignatureMismatch {
        /// The package.
        package: String,
        /// The key id the signature names.
        key_id: String,
    },
    /// The package's table digest is not the one pinned (`#sha256=`).
    #[error("package {package} is not the pinned one (its table sha256 is {actual}, the URL pins {pinned}): the server holds another package under this name; fetch the pinned package, or update the pin after checking the new one")]
    PinMismatch {
        /// The package.
        package: String,
        /// The digest pinned.
        pinned: String,
        /// The digest found.
        actual: String,
    },
    /// The destination of a package has no file name.
    #[error("{0} does not name a file: give the path of the package file to write")]
    InvalidDestination(PathBuf),
}

fn supported_versions() -> String {
    if FORMAT_MINOR == 0 {
        format!("{FORMAT_MAJOR}.0")
    } else {
        format!("{FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}")
    }
}

fn version_fix(major: u16, minor: u16) -> &'static str {
    if (major, minor) > (FORMAT_MAJOR, FORMAT_MINOR) {
        "upgrade ferry"
    } else {
        "rebuild the package with this ferry"
    }
}

impl PackageError {
    /// Maps an error from a write to `path`: a full disk becomes
    /// [`PackageError::NoSpace`].
    pub(crate) fn write(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| {
            use std::io::ErrorKind;
            if matches!(
                source.kind(),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded
            ) {
                PackageError::NoSpace { path }
            } else {
                PackageError::Io { path, source }
            }
        }
    }

    /// Maps an error from any other operation on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| PackageError::Io { path, source }
    }
}
