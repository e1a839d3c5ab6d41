//! A minimal writer for the `newc` cpio format the kernel unpacks as its
//! initramfs. Written here rather than shelling out to `cpio` so that the
//! archive can hold device nodes (`/dev/console`) without root and without
//! depending on the host's file ownership.

use std::io::{self, Write};

/// Builds an uncompressed newc archive in memory. The kernel unpacks an
/// uncompressed initramfs fastest, and ours is only a few MiB.
#[derive(Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], 0, 0);
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (mode & 0o7777), data, 0, 0);
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], major, minor);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rmajor: u32, rminor: u32) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rmajor,
            rminor,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Writes the trailer and the archive.
    pub fn finish(mut self, w: &mut impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, &[], 0, 0);
        w.write_all(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut c = CpioWriter::new();
        c.dir("bin");
        c.file("/init", 0o755, b"#!/bin/sh\n");
        c.char_device("dev/console", 5, 1);
        let mut out = Vec::new();
        c.finish(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The console node: mode 020600, rdev 5:1.
        assert!(text.contains("00002180"));
    }
}
