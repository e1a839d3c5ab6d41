//! What an NBD connection serves: a [`LazyDisk`], or a [`FileDisk`] (a
//! plain file, such as the disk of a VM being received live).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::disk::{check_range, file_extents, ignore_unsupported, zero_range};
use crate::error::LazyDiskError;
use crate::{sys, Extent, LazyDisk};

/// A disk an NBD connection can serve: the requests of the protocol, each
/// on a range the server has checked against [`size`](Self::size).
pub trait Export: Send + Sync {
    /// The file behind it, for messages.
    fn path(&self) -> &Path;
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LazyDiskError>;
    /// Writes `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), LazyDiskError>;
    /// Makes `len` bytes at `offset` read as zeros, as a hole if
    /// `allow_holes`.
    fn write_zeroes(&self, offset: u64, len: u64, allow_holes: bool) -> Result<(), LazyDiskError>;
    /// Discards `len` bytes at `offset`.
    fn trim(&self, offset: u64, len: u64) -> Result<(), LazyDiskError>;
    /// Which parts of the range are known to read as zeros.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, LazyDiskError>;
    /// Makes the range fast to read later.
    fn cache(&self, offset: u64, len: u64) -> Result<(), LazyDiskError>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), LazyDiskError>;
}

impl Export for LazyDisk {
    fn path(&self) -> &Path {
        LazyDisk::path(self)
    }
    fn size(&self) -> u64 {
        LazyDisk::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LazyDiskError> {
        LazyDisk::read_at(self, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), LazyDiskError> {
        LazyDisk::write_at(self, data, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, allow_holes: bool) -> Result<(), LazyDiskError> {
        LazyDisk::write_zeroes(self, offset, len, allow_holes)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        LazyDisk::trim(self, offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, LazyDiskError> {
        LazyDisk::extents(self, offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        LazyDisk::cache(self, offset, len)
    }
    fn flush(&self) -> Result<(), LazyDiskError> {
        LazyDisk::flush(self)
    }
}

/// A disk that is a plain raw file, all of it here: reads and writes go
/// straight to the file, discards and zeros become holes.
///
/// Why: a VM received live gets its disk from the source's engine as NBD
/// writes. Served by ferry on the peer's own connection, those writes
/// reach the file with no relay and no work in the receiving engine,
/// which waits paused meanwhile (docs/migration-protocol.md).
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileDisk {
    /// Opens the existing file at `path` for reading and writing; the
    /// disk's size is the file's.
    ///
    /// # Errors
    /// [`LazyDiskError::Io`] if it cannot be opened or measured.
    pub fn open(path: &Path) -> Result<FileDisk, LazyDiskError> {
        let io_error = |what| LazyDiskError::io(path, what);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error("open it"))?;
        let size = file.metadata().map_err(io_error("measure it"))?.len();
        Ok(FileDisk {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> LazyDiskError {
        LazyDiskError::io(&self.path, what)(source)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        check_range(&self.path, self.size, offset, len)
    }
}

impl Export for FileDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LazyDiskError> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error("read it", e))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), LazyDiskError> {
        self.check(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_error("write it", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, allow_holes: bool) -> Result<(), LazyDiskError> {
        self.check(offset, len)?;
        zero_range(&self.file, offset, len, allow_holes)
            .map_err(|e| self.io_error("zero a range of it", e))
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        self.check(offset, len)?;
        // Without hole punching a discard may leave the bytes as they were.
        ignore_unsupported(sys::punch_hole(&self.file, offset, len))
            .map_err(|e| self.io_error("punch a hole in it", e))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, LazyDiskError> {
        self.check(offset, len)?;
        Ok(file_extents(&self.file, &self.path, offset, offset + len)
            .into_iter()
            .map(|(len, zero)| Extent { len, zero })
            .collect())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        // All of it is here already.
        self.check(offset, len)
    }

    fn flush(&self) -> Result<(), LazyDiskError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_error("sync it", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_disk_writes_reads_and_punches_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let disk = FileDisk::open(&path).unwrap();
        assert_eq!(disk.size(), 4 << 20);
        disk.write_at(&[7u8; 8192], 1 << 20).unwrap();
        let mut back = [0u8; 8192];
        disk.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [7u8; 8192]);
        // Written data is data, the rest holes (where the file system can
        // tell; tmpfs and ext4 can).
        let extents = disk.extents(0, 4 << 20).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 4 << 20);
        assert!(extents.iter().any(|e| !e.zero));
        disk.write_zeroes(1 << 20, 8192, true).unwrap();
        disk.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [0u8; 8192]);
        assert!(disk.extents(0, 4 << 20).unwrap().iter().all(|e| e.zero));
        assert!(matches!(
            disk.write_at(&[1], 4 << 20),
            Err(LazyDiskError::OutOfRange { .. })
        ));
        disk.flush().unwrap();
    }
}
