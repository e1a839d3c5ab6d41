//! A VM's disk served before it has arrived.
//!
//! Resuming a package from a registry should not wait for its disk: the
//! guest needs a few megabytes of a disk of gigabytes to get going. A
//! [`LazyDisk`] is the VM's own disk file, created sparse at full size,
//! plus a state per package chunk (absent, fetching, present). Reads of
//! absent chunks fetch them first, with priority over a background thread
//! that fetches the rest in order; writes land in the local file only
//! (fetching a chunk first when they cover it only in part). When every
//! chunk is present the file is a plain raw image of the disk.
//!
//! [`NbdServer`] exports a lazy disk on a Unix socket to QEMU's built-in
//! NBD client, so the guest sees an ordinary block device; no kernel NBD
//! module or FUSE mount is needed. Chunks come from a [`ChunkSource`]: a
//! section of a package read over HTTP ([`RemoteSection`]) or from a local
//! file ([`LocalSection`]). `docs/lazy-disk.md` explains the design.
//!
//! The same server serves any [`Export`]: also a [`FileDisk`], a plain raw
//! file. [`NbdConnection`] serves one client on a connection the caller
//! already has: a live move's destination fills the disk it receives that
//! way, on the source's own connection (QEMU's NBD server would need a
//! listening socket, and a relay in front of it).
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//! use ferry_lazydisk::{LazyDisk, LazyDiskOptions, NbdServer, RemoteSection};
//! use ferry_package::SectionKind;
//! use ferry_transport::RemotePackage;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let package = Arc::new(RemotePackage::open("http://registry:7070/", None)?);
//! let source = RemoteSection::new(package, SectionKind::Disk)?;
//! let disk = Arc::new(LazyDisk::open(Path::new("vm/disk.raw"), source, LazyDiskOptions::default())?);
//! let server = NbdServer::serve(Path::new("vm/disk.nbd"), disk.clone())?;
//! // qemu-system-x86_64 ... -blockdev driver=raw,node-name=d0,file.driver=nbd,\
//! //     file.server.type=unix,file.server.path=vm/disk.nbd
//! disk.wait_complete(std::time::Duration::from_secs(600));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod disk;
mod error;
mod export;
mod nbd;
mod present;
mod source;
mod sys;

pub use disk::{ChunkFailure, ChunkState, Extent, LazyDisk, LazyDiskOptions, LazyDiskStatus};
pub use error::{LazyDiskError, NbdError, SharedError};
pub use export::{Export, FileDisk};
pub use nbd::{
    replay_client, ClientReplay, NbdConnection, NbdOptions, NbdServer, NbdStream, ReplayedRequest,
    MAX_PAYLOAD,
};
pub use source::{ChunkSource, LocalSection, RemoteSection};
