//! Ferry packages: one self-describing, versioned, checksummed file holding a
//! snapshotted VM.
//!
//! A package has sections (config, device state, memory, kernel, initramfs,
//! disk). Each section is cut into fixed-size chunks, each with its own
//! sha256 and compression, so that any chunk can be fetched (an HTTP range
//! request) and verified alone. All-zero chunks are not stored: guest memory
//! is mostly zero, and the package stays small.
//!
//! The layout is a 4096-byte header, the chunk data, then a JSON section
//! table; `docs/package-format.md` describes it byte by byte.
//!
//! The metadata of a package is a [`VmMeta`]: what the VM inside is and
//! what it was made with (see `meta.rs` for how versions stay compatible).
//!
//! A package may be signed ([`PackageWriter::sign_with`]): an ed25519
//! signature of its table's digest, in a block that readers of format 1.0
//! ignore; [`TrustedKeys::check`] is what `--trust` runs (see `sign.rs`).
//!
//! ```no_run
//! use ferry_package::{Package, PackageWriter, SectionKind, VmMeta, DEFAULT_CHUNK_SIZE};
//! use std::path::Path;
//!
//! # fn main() {}
//! # fn write(meta: &VmMeta) -> Result<(), ferry_package::PackageError> {
//! let mut w = PackageWriter::create(Path::new("vm.ferry"))?;
//! w.add_bytes(SectionKind::Config, br#"{"memory_mib":512}"#)?;
//! w.add_file(SectionKind::Memory, Path::new("mem.raw"), DEFAULT_CHUNK_SIZE, None, &mut |_, _| {})?;
//! w.commit(meta)?;
//!
//! let p = Package::open(Path::new("vm.ferry"))?;
//! assert_eq!(&p.vm_meta()?, meta);
//! p.extract(SectionKind::Memory, Path::new("mem.restored"), &mut |_, _| {})?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod chunk;
mod error;
mod header;
mod index;
mod key;
mod meta;
mod reader;
mod sign;
mod table;
mod writer;

pub use error::PackageError;
pub use index::PackageIndex;
pub use key::{
    generate_key_pair, KeyError, KeyPairFiles, PublicKey, SecretKey, PUBLIC_KEY_HEADER,
    SECRET_KEY_HEADER,
};
pub use meta::VmMeta;
pub use reader::{Package, VerifyReport};
pub use sign::{PackageSignature, TablePin, TrustedKeys, SIGNATURE_BLOCK_LEN};
pub use table::{ChunkEntry, Compression, SectionInfo, SectionKind};
pub use writer::{PackageWriter, WriteStats};

/// The first eight bytes of every package.
pub const MAGIC: &[u8; 8] = b"FERRYPKG";
/// The package format's major version: a reader refuses any other major.
pub const FORMAT_MAJOR: u16 = 1;
/// The newest minor version this crate reads and the one it writes.
pub const FORMAT_MINOR: u16 = 0;
/// The chunk size used unless the caller picks another: 2 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;
/// Size of the fixed header at the start of the file.
pub const HEADER_SIZE: u64 = 4096;
/// Largest section table a reader accepts: 64 MiB.
pub const MAX_TABLE_LEN: u64 = 64 << 20;
/// Smallest chunk size (chunk sizes are multiples of it).
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// Largest chunk size: 64 MiB.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
