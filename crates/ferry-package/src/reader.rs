//! Reading a package: [`Package::open`] checks the header and the table; each
//! chunk is checked against its sha256 whenever it is read.

use std::ffi::OsString;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunk;
use crate::error::PackageError;
use crate::index::PackageIndex;
use crate::meta::VmMeta;
use crate::table::{ChunkEntry, SectionInfo, SectionKind};
use crate::writer::create_temp;
use crate::HEADER_SIZE;

/// At most this many bytes of chunks are decoded at once when extracting or
/// verifying.
const BATCH_BYTES: u64 = 64 << 20;

/// An open, checked package. Reads are positioned (`pread`), so a `&Package`
/// can be shared between threads.
#[derive(Debug)]
pub struct Package {
    path: PathBuf,
    file: File,
    index: PackageIndex,
}

/// What [`Package::verify`] checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Sections in the package.
    pub sections: usize,
    /// Stored chunks read, decoded and checked against their sha256.
    pub chunks_checked: u64,
    /// All-zero chunks (nothing stored, nothing to check).
    pub zero_chunks: u64,
    /// Stored bytes read from the file.
    pub bytes_read: u64,
}

impl Package {
    /// Opens `path` and checks its header and section table (not the chunks:
    /// see [`verify`](Self::verify)), and reads its signature if it has one
    /// (whether it is trusted is [`TrustedKeys::check`](crate::TrustedKeys::check)'s
    /// question).
    ///
    /// # Errors
    /// [`PackageError::Io`], [`PackageError::NotAPackage`],
    /// [`PackageError::Truncated`], [`PackageError::UnsupportedVersion`],
    /// [`PackageError::HeaderCorrupt`] or [`PackageError::TableCorrupt`].
    pub fn open(path: &Path) -> Result<Self, PackageError> {
        let file = File::open(path).map_err(PackageError::io(path))?;
        let file_len = file.metadata().map_err(PackageError::io(path))?.len();
        let mut head = vec![0u8; file_len.min(HEADER_SIZE) as usize];
        read_at(&file, path, &mut head, 0)?;
        let range = PackageIndex::table_range(path, &head, file_len)?;
        // The header checks bounded the length by MAX_TABLE_LEN.
        let mut table = vec![0u8; (range.end - range.start) as usize];
        read_at(&file, path, &mut table, range.start)?;
        let mut index = PackageIndex::from_parts(path, &head, &table, file_len)?;
        if let Some(r) = index.signature_range() {
            let mut block = vec![0u8; (r.end - r.start) as usize];
            read_at(&file, path, &mut block, r.start)?;
            index = index.with_signature_block(&block);
        }
        Ok(Package {
            path: path.to_path_buf(),
            file,
            index,
        })
    }

    /// The path the package was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The package's format version (major, minor).
    pub fn format_version(&self) -> (u16, u16) {
        self.index.format_version()
    }

    /// What the package says about the VM inside it.
    ///
    /// # Errors
    /// [`PackageError::NotAVmPackage`] if its metadata is not a VM's that
    /// this version reads (another program's package, or a field missing).
    pub fn vm_meta(&self) -> Result<VmMeta, PackageError> {
        VmMeta::from_json(self.index.metadata(), &self.path.display().to_string())
    }

    /// All sections, in the order they were written.
    pub fn sections(&self) -> &[SectionInfo] {
        self.index.sections()
    }

    /// The section of kind `kind`.
    ///
    /// # Errors
    /// [`PackageError::MissingSection`] if the package has none.
    pub fn section(&self, kind: SectionKind) -> Result<&SectionInfo, PackageError> {
        self.index.section(kind)
    }

    /// Size of the package file (what a registry sends).
    pub fn file_size(&self) -> u64 {
        self.index.file_len()
    }

    /// The checked header and table: what a registry lists and derives its
    /// `ETag` from ([`PackageIndex::table_sha256`]).
    pub fn index(&self) -> &PackageIndex {
        &self.index
    }

    /// The open file, for positioned reads (`pread`) of its bytes as they
    /// are: a registry serves the file it checked at open even if the path is
    /// later replaced by another package.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads and verifies chunk `index` of section `kind`: its uncompressed
    /// bytes, or zeros for an all-zero chunk.
    ///
    /// # Errors
    /// [`PackageError::MissingSection`], [`PackageError::ChunkOutOfRange`],
    /// [`PackageError::ChunkCorrupt`], or [`PackageError::Truncated`] /
    /// [`PackageError::Io`] if the file cannot be read.
    pub fn read_chunk(&self, kind: SectionKind, index: usize) -> Result<Vec<u8>, PackageError> {
        let section = self.section(kind)?;
        match section.chunks.get(index) {
            Some(Some(entry)) => section.decode_chunk(index, &self.read_stored(entry)?),
            _ => section.decode_chunk(index, &[]),
        }
    }

    /// Reads and verifies a whole section into memory: meant for small
    /// sections (config, device state); extract large ones to a file.
    ///
    /// # Errors
    /// As [`read_chunk`](Self::read_chunk), and
    /// [`PackageError::SectionTooLarge`] if the memory cannot be had.
    pub fn read_bytes(&self, kind: SectionKind) -> Result<Vec<u8>, PackageError> {
        let section = self.section(kind)?;
        let too_large = || PackageError::SectionTooLarge {
            kind,
            size: section.size,
        };
        let size = usize::try_from(section.size).map_err(|_| too_large())?;
        let mut out = Vec::new();
        out.try_reserve_exact(size).map_err(|_| too_large())?;
        self.for_each_chunk(section, |_, index, data| {
            match data {
                Some(data) => out.extend_from_slice(&data),
                None => {
                    let len = section.chunk_len(index).expect("index in range") as usize;
                    out.resize(out.len() + len, 0);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Writes section `kind` to `dest` (through a new `<dest>.tmp-<pid>` and a
    /// rename, so concurrent extractions of one file do not mix),
    /// verifying every chunk, and leaving all-zero chunks as holes so the file
    /// is sparse. `progress(done_bytes, total_bytes)` is called now and then.
    /// On error `dest` is untouched and the temporary file removed.
    ///
    /// # Errors
    /// As [`read_chunk`](Self::read_chunk), and [`PackageError::NoSpace`] /
    /// [`PackageError::Io`] writing `dest`.
    pub fn extract(
        &self,
        kind: SectionKind,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), PackageError> {
        let section = self.section(kind)?;
        let mut prefix = OsString::from(dest.as_os_str());
        prefix.push(".tmp");
        let (tmp, out) =
            create_temp(Path::new(&prefix)).map_err(|(path, e)| PackageError::write(path)(e))?;
        let result = self
            .extract_to(section, &out, &tmp, progress)
            .and_then(|()| std::fs::rename(&tmp, dest).map_err(PackageError::io(dest)));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn extract_to(
        &self,
        section: &SectionInfo,
        out: &File,
        tmp: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), PackageError> {
        let write = PackageError::write;
        // Zero chunks are never written: they stay holes.
        out.set_len(section.size).map_err(write(tmp))?;
        let mut done = 0u64;
        progress(0, section.size);
        self.for_each_chunk(section, |_, index, data| {
            let len = section.chunk_len(index).expect("index in range");
            if let Some(data) = data {
                out.write_all_at(&data, index as u64 * section.chunk_size)
                    .map_err(write(tmp))?;
            }
            done += len;
            progress(done, section.size);
            Ok(())
        })?;
        out.sync_all().map_err(write(tmp))
    }

    /// Reads and checks every stored chunk of every section.
    /// `progress(done_bytes, total_bytes)` counts stored bytes.
    ///
    /// # Errors
    /// The first [`PackageError::ChunkCorrupt`] (or read error) met.
    pub fn verify(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<VerifyReport, PackageError> {
        let sections = self.index.sections();
        let total: u64 = sections.iter().map(SectionInfo::stored_bytes).sum();
        let mut report = VerifyReport {
            sections: sections.len(),
            ..VerifyReport::default()
        };
        progress(0, total);
        for section in sections {
            self.for_each_chunk(section, |entry, _, _| {
                match entry {
                    Some(e) => {
                        report.chunks_checked += 1;
                        report.bytes_read += e.stored_len;
                        progress(report.bytes_read, total);
                    }
                    None => report.zero_chunks += 1,
                }
                Ok(())
            })?;
        }
        Ok(report)
    }

    /// Reads, decodes and verifies the chunks of `section` in batches on
    /// several threads, then hands each to `sink` in order: its entry, index
    /// and data (`None` for a zero chunk, which is not materialised).
    fn for_each_chunk(
        &self,
        section: &SectionInfo,
        mut sink: impl FnMut(Option<&ChunkEntry>, usize, Option<Vec<u8>>) -> Result<(), PackageError>,
    ) -> Result<(), PackageError> {
        let threads = chunk::threads();
        let batch = (threads as u64 * 2).min((BATCH_BYTES / section.chunk_size).max(1)) as usize;
        let indices: Vec<usize> = (0..section.chunks.len()).collect();
        for group in indices.chunks(batch) {
            let decoded = chunk::par_map(group, threads, |&i| match &section.chunks[i] {
                Some(entry) => self
                    .read_stored(entry)
                    .and_then(|stored| section.decode_chunk(i, &stored))
                    .map(Some),
                None => Ok(None),
            });
            for (&i, data) in group.iter().zip(decoded) {
                sink(section.chunks[i].as_ref(), i, data?)?;
            }
        }
        Ok(())
    }

    /// The stored bytes of one chunk, as they are in the file.
    pub(crate) fn read_stored(&self, entry: &ChunkEntry) -> Result<Vec<u8>, PackageError> {
        // `open` checked that the chunk lies inside the file.
        let mut buf = vec![0u8; entry.stored_len as usize];
        read_at(&self.file, &self.path, &mut buf, entry.offset)?;
        Ok(buf)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is `Truncated`.
fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), PackageError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            PackageError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "{} bytes at offset {offset} could not be read: the file got shorter",
                    buf.len()
                ),
            }
        } else {
            PackageError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}
