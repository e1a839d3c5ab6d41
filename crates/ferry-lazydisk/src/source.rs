//! Where a lazy disk's chunks come from: one section of a package, local or
//! remote. The disk needs only sizes, which chunks are all zero, and a way
//! to fetch one verified chunk; [`ChunkSource`] is exactly that, so a new
//! transport is one small impl.

use std::sync::Arc;

use ferry_package::{Package, PackageError, SectionInfo, SectionKind};
use ferry_transport::{RemotePackage, TransportError};

use crate::error::SharedError;

/// A disk image cut into fixed-size chunks that can be fetched one by one,
/// each already verified. Shared between the threads of a lazy disk.
pub trait ChunkSource: Send + Sync {
    /// What [`fetch`](Self::fetch) fails with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Size of the disk in bytes.
    fn len(&self) -> u64;

    /// Whether the disk has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of every chunk but the last, which may be shorter.
    fn chunk_size(&self) -> u64;

    /// Number of chunks.
    fn chunk_count(&self) -> usize {
        match self.chunk_size() {
            0 => 0,
            size => self.len().div_ceil(size) as usize,
        }
    }

    /// Whether chunk `index` is all zeros, known without fetching it (a
    /// package does not store such chunks).
    fn is_zero(&self, index: usize) -> bool;

    /// The bytes of chunk `index`, checked against the source's own
    /// checksums: exactly the chunk's length.
    ///
    /// # Errors
    /// Whatever the source fails with: the chunk cannot be had or does not
    /// match its checksum.
    fn fetch(&self, index: usize) -> Result<Vec<u8>, Self::Error>;

    /// Identifies the disk's content (a package section's digest). A lazy
    /// disk records it beside its file so that a restart never mixes the
    /// chunks of two disks.
    fn digest(&self) -> &str;

    /// The source in words, for messages (`section disk of URL`).
    fn describe(&self) -> String;

    /// Bytes the source has moved so far (for a remote package: response
    /// bodies received), when it counts them.
    fn bytes_transferred(&self) -> Option<u64> {
        None
    }
}

/// A section of a package read over HTTP ([`RemotePackage`]).
#[derive(Debug, Clone)]
pub struct RemoteSection {
    package: Arc<RemotePackage>,
    info: SectionInfo,
}

impl RemoteSection {
    /// Section `kind` of `package`.
    ///
    /// # Errors
    /// [`TransportError::Package`] if the package has no such section.
    pub fn new(package: Arc<RemotePackage>, kind: SectionKind) -> Result<Self, TransportError> {
        let info = package.section(kind)?.clone();
        Ok(RemoteSection { package, info })
    }

    /// The package the chunks come from.
    pub fn package(&self) -> &Arc<RemotePackage> {
        &self.package
    }

    /// The section's table entry.
    pub fn info(&self) -> &SectionInfo {
        &self.info
    }
}

impl ChunkSource for RemoteSection {
    type Error = TransportError;

    fn len(&self) -> u64 {
        self.info.size
    }

    fn chunk_size(&self) -> u64 {
        self.info.chunk_size
    }

    fn chunk_count(&self) -> usize {
        self.info.chunk_count()
    }

    fn is_zero(&self, index: usize) -> bool {
        matches!(self.info.chunks.get(index), Some(None))
    }

    fn fetch(&self, index: usize) -> Result<Vec<u8>, TransportError> {
        self.package.read_chunk(self.info.kind, index)
    }

    fn digest(&self) -> &str {
        &self.info.digest
    }

    fn describe(&self) -> String {
        format!("section {} of {}", self.info.kind, self.package.url())
    }

    fn bytes_transferred(&self) -> Option<u64> {
        Some(self.package.bytes_fetched())
    }
}

/// A section of a package on a local file system ([`Package`]): for tests,
/// and for starting a VM before a large local package is extracted.
#[derive(Debug, Clone)]
pub struct LocalSection {
    package: Arc<Package>,
    info: SectionInfo,
}

impl LocalSection {
    /// Section `kind` of `package`.
    ///
    /// # Errors
    /// [`PackageError::MissingSection`] if the package has no such section.
    pub fn new(package: Arc<Package>, kind: SectionKind) -> Result<Self, PackageError> {
        let info = package.section(kind)?.clone();
        Ok(LocalSection { package, info })
    }

    /// The package the chunks come from.
    pub fn package(&self) -> &Arc<Package> {
        &self.package
    }

    /// The section's table entry.
    pub fn info(&self) -> &SectionInfo {
        &self.info
    }
}

impl ChunkSource for LocalSection {
    type Error = PackageError;

    fn len(&self) -> u64 {
        self.info.size
    }

    fn chunk_size(&self) -> u64 {
        self.info.chunk_size
    }

    fn chunk_count(&self) -> usize {
        self.info.chunk_count()
    }

    fn is_zero(&self, index: usize) -> bool {
        matches!(self.info.chunks.get(index), Some(None))
    }

    fn fetch(&self, index: usize) -> Result<Vec<u8>, PackageError> {
        self.package.read_chunk(self.info.kind, index)
    }

    fn digest(&self) -> &str {
        &self.info.digest
    }

    fn describe(&self) -> String {
        format!(
            "section {} of {}",
            self.info.kind,
            self.package.path().display()
        )
    }
}

/// [`ChunkSource`] with its error type erased, so that a lazy disk (and the
/// NBD server above it) is one type whatever the source.
pub(crate) trait DynSource: Send + Sync {
    fn len(&self) -> u64;
    fn chunk_size(&self) -> u64;
    fn chunk_count(&self) -> usize;
    fn is_zero(&self, index: usize) -> bool;
    fn fetch(&self, index: usize) -> Result<Vec<u8>, SharedError>;
    fn digest(&self) -> &str;
    fn describe(&self) -> String;
    fn bytes_transferred(&self) -> Option<u64>;
}

impl<S: ChunkSource> DynSource for S {
    fn len(&self) -> u64 {
        ChunkSource::len(self)
    }
    fn chunk_size(&self) -> u64 {
        ChunkSource::chunk_size(self)
    }
    fn chunk_count(&self) -> usize {
        ChunkSource::chunk_count(self)
    }
    fn is_zero(&self, index: usize) -> bool {
        ChunkSource::is_zero(self, index)
    }
    fn fetch(&self, index: usize) -> Result<Vec<u8>, SharedError> {
        ChunkSource::fetch(self, index).map_err(|e| Arc::new(e) as SharedError)
    }
    fn digest(&self) -> &str {
        ChunkSource::digest(self)
    }
    fn describe(&self) -> String {
        ChunkSource::describe(self)
    }
    fn bytes_transferred(&self) -> Option<u64> {
        ChunkSource::bytes_transferred(self)
    }
}
