//! Writing a package: chunks go to a temporary file next to the destination,
//! which [`PackageWriter::commit`] renames over it, so the destination is at
//! every instant either the old package or the complete new one.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::chunk;
use crate::error::PackageError;
use crate::header::Header;
use crate::key::SecretKey;
use crate::meta::VmMeta;
use crate::reader::Package;
use crate::table::{self, ChunkEntry, Compression, SectionInfo, SectionKind, Table};
use crate::{DEFAULT_CHUNK_SIZE, FORMAT_MAJOR, FORMAT_MINOR, HEADER_SIZE, MAX_TABLE_LEN};

/// At most this many bytes of input are in memory at once (per batch).
const BATCH_BYTES: u64 = 64 << 20;

/// What a writer did with the chunks it was given, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// All-zero chunks, not stored.
    pub zero_chunks: u64,
    /// Chunks stored zstd-compressed (reused ones included).
    pub compressed_chunks: u64,
    /// Chunks stored as they are (reused ones included).
    pub raw_chunks: u64,
    /// Chunks whose stored bytes were copied from the `reuse` package.
    pub reused_chunks: u64,
    /// Uncompressed bytes of all sections added.
    pub input_bytes: u64,
    /// Bytes of chunk data written.
    pub stored_bytes: u64,
}

impl WriteStats {
    fn add(&mut self, other: &WriteStats) {
        self.zero_chunks += other.zero_chunks;
        self.compressed_chunks += other.compressed_chunks;
        self.raw_chunks += other.raw_chunks;
        self.reused_chunks += other.reused_chunks;
        self.input_bytes += other.input_bytes;
        self.stored_bytes += other.stored_bytes;
    }
}

/// Writes a package. Add sections with [`add_file`](Self::add_file) or
/// [`add_bytes`](Self::add_bytes), then [`commit`](Self::commit); dropping
/// the writer without committing removes its temporary file and leaves the
/// destination untouched.
#[derive(Debug)]
pub struct PackageWriter {
    dest: PathBuf,
    dir: PathBuf,
    tmp: PathBuf,
    file: File,
    /// Where the next chunk goes.
    pos: u64,
    sections: Vec<SectionInfo>,
    stats: WriteStats,
    /// Signs the table on commit.
    signer: Option<SecretKey>,
    committed: bool,
}

/// Where a section's bytes come from.
enum Source<'a> {
    File { file: File, path: &'a Path },
    Bytes(&'a [u8]),
}

/// The outcome of looking at one chunk.
enum Processed {
    Zero,
    Stored {
        sha: [u8; 32],
        compression: Compression,
        /// The bytes to store, when they are not the chunk itself.
        packed: Option<Vec<u8>>,
        reused: bool,
    },
}

impl PackageWriter {
    /// Starts writing a package that will replace `dest` on commit: the data
    /// goes to a temporary file `.<name>.tmp-<pid>` in `dest`'s directory (so
    /// the final rename is atomic); dropping the writer without commit
    /// removes the temporary file.
    ///
    /// # Errors
    /// [`PackageError::InvalidDestination`] if `dest` has no file name;
    /// [`PackageError::Io`] if the temporary file cannot be created.
    pub fn create(dest: &Path) -> Result<Self, PackageError> {
        let name = dest
            .file_name()
            .ok_or_else(|| PackageError::InvalidDestination(dest.to_path_buf()))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let (tmp, file) =
            create_temp(&dir.join(tmp_name)).map_err(|(path, e)| PackageError::write(path)(e))?;
        Ok(PackageWriter {
            dest: dest.to_path_buf(),
            dir,
            tmp,
            file,
            pos: HEADER_SIZE,
            sections: Vec::new(),
            stats: WriteStats::default(),
            signer: None,
            committed: false,
        })
    }

    /// Adds a section from the regular file at `path`, read in `chunk_size`
    /// pieces. All-zero chunks are not stored; the others are compressed with
    /// zstd (level 1) when that saves at least an eighth, else stored raw.
    ///
    /// With `reuse`, an already-open older package: when a chunk's sha256
    /// equals that of the chunk at the same index of the same section kind in
    /// `reuse`, its stored bytes (and compression) are copied verbatim instead
    /// of compressing again, once they are checked to decode to this chunk (a
    /// damaged `reuse` chunk is simply compressed anew). This is what makes
    /// writing back a mostly unchanged VM fast.
    ///
    /// `progress(done_bytes, total_bytes)` is called after each batch of
    /// chunks.
    ///
    /// # Errors
    /// [`PackageError::DuplicateSection`], [`PackageError::InvalidChunkSize`],
    /// [`PackageError::Io`] reading `path`, [`PackageError::NoSpace`] or
    /// [`PackageError::Io`] writing. On error the section is not added and
    /// the writer can still be used.
    pub fn add_file(
        &mut self,
        kind: SectionKind,
        path: &Path,
        chunk_size: u64,
        reuse: Option<&Package>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<&SectionInfo, PackageError> {
        self.check_new_section(kind, chunk_size)?;
        let file = File::open(path).map_err(PackageError::io(path))?;
        let size = file.metadata().map_err(PackageError::io(path))?.len();
        self.add(
            kind,
            Source::File { file, path },
            size,
            chunk_size,
            reuse,
            progress,
        )
    }

    /// Adds a section from memory, in chunks of [`DEFAULT_CHUNK_SIZE`].
    ///
    /// # Errors
    /// As [`add_file`](Self::add_file), less the reading.
    pub fn add_bytes(
        &mut self,
        kind: SectionKind,
        data: &[u8],
    ) -> Result<&SectionInfo, PackageError> {
        self.check_new_section(kind, DEFAULT_CHUNK_SIZE)?;
        self.add(
            kind,
            Source::Bytes(data),
            data.len() as u64,
            DEFAULT_CHUNK_SIZE,
            None,
            &mut |_, _| {},
        )
    }

    /// The sections added so far.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.sections
    }

    /// What happened to the chunks added so far.
    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    /// Signs the package with `key` on [`commit`](Self::commit): a
    /// signature block of the table's digest goes just before the table
    /// (`docs/package-format.md`, "Signature").
    pub fn sign_with(&mut self, key: SecretKey) {
        self.signer = Some(key);
    }

    /// Writes the table (with `meta`, what the package says about its VM)
    /// and the header, fsyncs the file, renames it over the destination and
    /// fsyncs the directory. At every instant the destination is either the
    /// old package (or absent) or the complete new one.
    ///
    /// # Errors
    /// [`PackageError::TableTooLarge`] if the table would exceed
    /// [`MAX_TABLE_LEN`]; [`PackageError::NoSpace`] or [`PackageError::Io`]
    /// for a failed write, sync or rename. An error from the final directory
    /// sync comes after the rename: the new package is in place but may not
    /// survive a power loss.
    pub fn commit(mut self, meta: &VmMeta) -> Result<(), PackageError> {
        let table = Table {
            metadata: serde_json::to_value(meta).expect("VmMeta serialises"),
            sections: std::mem::take(&mut self.sections),
        };
        let json = serde_json::to_vec(&table).map_err(|e| PackageError::Io {
            path: self.tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        let table_len = json.len() as u64;
        if table_len > MAX_TABLE_LEN {
            return Err(PackageError::TableTooLarge {
                size: table_len,
                limit: MAX_TABLE_LEN,
            });
        }
        let table_sha256: [u8; 32] = Sha256::digest(&json).into();
        let write = PackageError::write;
        let mut table_offset = self.pos;
        if let Some(key) = &self.signer {
            // In the data area, where no chunk refers: a reader that knows
            // nothing of signatures skips it.
            self.file
                .write_all_at(&crate::sign::encode_block(key, &table_sha256), self.pos)
                .map_err(write(&self.tmp))?;
            table_offset += crate::sign::SIGNATURE_BLOCK_LEN;
        }
        let header = Header {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            flags: 0,
            table_offset,
            table_len,
            table_sha256,
        };
        self.file
            .write_all_at(&json, table_offset)
            .map_err(write(&self.tmp))?;
        // Drops whatever a failed section may have left past the table.
        self.file
            .set_len(table_offset + table_len)
            .map_err(write(&self.tmp))?;
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(write(&self.tmp))?;
        self.file.sync_all().map_err(write(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(PackageError::io(&self.dest))?;
        self.committed = true;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(PackageError::io(&self.dir))
    }

    fn check_new_section(&self, kind: SectionKind, chunk_size: u64) -> Result<(), PackageError> {
        if self.sections.iter().any(|s| s.kind == kind) {
            return Err(PackageError::DuplicateSection(kind));
        }
        if !table::chunk_size_ok(chunk_size) {
            return Err(PackageError::InvalidChunkSize(chunk_size));
        }
        Ok(())
    }

    fn add(
        &mut self,
        kind: SectionKind,
        source: Source<'_>,
        size: u64,
        chunk_size: u64,
        reuse: Option<&Package>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<&SectionInfo, PackageError> {
        let start = self.pos;
        let mut stats = WriteStats::default();
        match self.write_section(kind, &source, size, chunk_size, reuse, progress, &mut stats) {
            Ok(info) => {
                self.stats.add(&stats);
                self.sections.push(info);
                Ok(self.sections.last().expect("just pushed"))
            }
            Err(e) => {
                // Whatever was written past `start` is overwritten by the next
                // section or cut off by commit.
                self.pos = start;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_section(
        &mut self,
        kind: SectionKind,
        source: &Source<'_>,
        size: u64,
        chunk_size: u64,
        reuse: Option<&Package>,
        progress: &mut dyn FnMut(u64, u64),
        stats: &mut WriteStats,
    ) -> Result<SectionInfo, PackageError> {
        let count = size.div_ceil(chunk_size);
        let threads = chunk::threads();
        let batch = (threads as u64 * 2).min((BATCH_BYTES / chunk_size).max(1));
        let old = reuse.and_then(|p| p.sections().iter().find(|s| s.kind == kind).map(|s| (p, s)));
        let mut chunks = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut shas: Vec<Option<[u8; 32]>> = Vec::with_capacity(chunks.capacity());
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut first = 0u64;
        progress(0, size);
        while first < count {
            let last = (first + batch).min(count);
            let range = |i: u64| {
                let s = i * chunk_size;
                (s, (size - s).min(chunk_size))
            };
            // Chunks that lie wholly in a hole of a sparse file are zero:
            // they are neither read nor scanned (a 1 GiB disk image is mostly
            // holes).
            let holes: Vec<bool> = match source {
                Source::Bytes(_) => vec![false; (last - first) as usize],
                Source::File { file, .. } => (first..last)
                    .map(|i| {
                        let (s, n) = range(i);
                        is_hole(file, s, n)
                    })
                    .collect(),
            };
            let items: Vec<(usize, &[u8])> = match source {
                Source::Bytes(data) => (first..last)
                    .map(|i| {
                        let (s, n) = range(i);
                        (i as usize, &data[s as usize..(s + n) as usize])
                    })
                    .collect(),
                Source::File { file, path } => {
                    bufs.resize_with((last - first) as usize, Vec::new);
                    for ((buf, i), hole) in bufs.iter_mut().zip(first..last).zip(&holes) {
                        if *hole {
                            buf.clear();
                            continue;
                        }
                        let (s, n) = range(i);
                        buf.resize(n as usize, 0);
                        file.read_exact_at(buf, s).map_err(|e| {
                            let source = if e.kind() == ErrorKind::UnexpectedEof {
                                std::io::Error::new(
                                    e.kind(),
                                    "the file got shorter while it was being packaged",
                                )
                            } else {
                                e
                            };
                            PackageError::Io {
                                path: path.to_path_buf(),
                                source,
                            }
                        })?;
                    }
                    (first..last)
                        .zip(&bufs)
                        .zip(&holes)
                        .filter(|(_, hole)| !**hole)
                        .map(|((i, b), _)| (i as usize, &b[..]))
                        .collect()
                }
            };
            let results = chunk::par_map(&items, threads, |&(i, data)| process(i, data, old));
            let mut results = items.iter().zip(results);
            for (i, hole) in (first..last).zip(&holes) {
                if *hole {
                    stats.input_bytes += range(i).1;
                    stats.zero_chunks += 1;
                    chunks.push(None);
                    shas.push(None);
                    continue;
                }
                let ((_, data), result) = results.next().expect("one result per data chunk");
                stats.input_bytes += data.len() as u64;
                match result {
                    Processed::Zero => {
                        stats.zero_chunks += 1;
                        chunks.push(None);
                        shas.push(None);
                    }
                    Processed::Stored {
                        sha,
                        compression,
                        packed,
                        reused,
                    } => {
                        let bytes = packed.as_deref().unwrap_or(data);
                        self.file
                            .write_all_at(bytes, self.pos)
                            .map_err(PackageError::write(&self.tmp))?;
                        let stored_len = bytes.len() as u64;
                        chunks.push(Some(ChunkEntry {
                            offset: self.pos,
                            stored_len,
                            compression,
                            sha256: hex::encode(sha),
                        }));
                        shas.push(Some(sha));
                        self.pos += stored_len;
                        stats.stored_bytes += stored_len;
                        stats.reused_chunks += u64::from(reused);
                        match compression {
                            Compression::None => stats.raw_chunks += 1,
                            Compression::Zstd => stats.compressed_chunks += 1,
                        }
                    }
                }
            }
            first = last;
            progress(stats.input_bytes, size);
        }
        Ok(SectionInfo {
            kind,
            size,
            chunk_size,
            digest: table::section_digest(size, chunk_size, shas.iter().map(Option::as_ref)),
            chunks,
        })
    }
}

/// Whether `len` bytes at `start` of `file` are all in a hole (read as zero
/// without being stored). Any doubt (no SEEK_DATA support) says no.
fn is_hole(file: &File, start: u64, len: u64) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(offset) = libc::off_t::try_from(start) else {
        return false;
    };
    // SAFETY: lseek on a descriptor owned by `file`, which outlives the call;
    // it only moves the file offset, which positioned reads ignore.
    let next_data = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    if next_data < 0 {
        // ENXIO: no data at or after `start`; anything else: unknown.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next_data as u64 >= start + len
}

/// Decides how to store chunk `index` (whose bytes are `data`), reusing the
/// stored bytes of the same chunk in `old` when they decode to `data`.
fn process(index: usize, data: &[u8], old: Option<(&Package, &SectionInfo)>) -> Processed {
    if chunk::is_zero(data) {
        return Processed::Zero;
    }
    let sha = chunk::sha256(data);
    if let Some((pkg, section)) = old {
        if let Some(Some(entry)) = section.chunks.get(index) {
            if entry.sha256 == hex::encode(sha) {
                if let Ok(stored) = pkg.read_stored(entry) {
                    let same = match entry.compression {
                        Compression::None => stored == data,
                        Compression::Zstd => {
                            chunk::decompress(&stored, data.len()).as_deref() == Some(data)
                        }
                    };
                    if same {
                        return Processed::Stored {
                            sha,
                            compression: entry.compression,
                            packed: (entry.compression != Compression::None).then_some(stored),
                            reused: true,
                        };
                    }
                }
            }
        }
    }
    match chunk::compress(data) {
        Some(packed) => Processed::Stored {
            sha,
            compression: Compression::Zstd,
            packed: Some(packed),
            reused: false,
        },
        None => Processed::Stored {
            sha,
            compression: Compression::None,
            packed: None,
            reused: false,
        },
    }
}

/// Creates a new file `<prefix>-<pid>` (or `<prefix>-<pid>-<n>` if another
/// writer of this process has that one), so that concurrent writers never
/// share a temporary file.
pub(crate) fn create_temp(prefix: &Path) -> Result<(PathBuf, File), (PathBuf, std::io::Error)> {
    let pid = std::process::id();
    let mut attempt = 0u32;
    loop {
        let mut name = OsString::from(prefix.as_os_str());
        name.push(format!("-{pid}"));
        if attempt > 0 {
            name.push(format!("-{attempt}"));
        }
        let path = PathBuf::from(name);
        // 0600: a package holds guest memory (keys, secrets).
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 1000 => attempt += 1,
            Err(e) => return Err((path, e)),
        }
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
