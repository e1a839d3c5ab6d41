use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The error a chunk source failed with, shared by every request that was
/// waiting for that one fetch.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync>;

/// What can go wrong opening or using a [`LazyDisk`](crate::LazyDisk). Each
/// message names the disk file and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum LazyDiskError {
    /// The disk file or its present-map cannot be created, read or written.
    #[error("{}: cannot {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another lazy disk holds the file's lock.
    #[error("{}: another lazy disk (in this or another process) is using it: stop that one first", path.display())]
    InUse {
        /// The disk file.
        path: PathBuf,
    },
    /// The disk file exists without its present-map: it was not made by a
    /// lazy disk, or the record of which chunks arrived is lost, so no chunk
    /// in it can be trusted.
    #[error("{} exists but {} does not: it was not made by a lazy disk, or its record of fetched chunks is lost; remove it to fetch the disk again", path.display(), map.display())]
    NoPresentMap {
        /// The disk file.
        path: PathBuf,
        /// The present-map it lacks.
        map: PathBuf,
    },
    /// The present-map is damaged.
    #[error("{}: {detail}: remove it and {} to fetch the disk again", map.display(), path.display())]
    PresentMapCorrupt {
        /// The disk file.
        path: PathBuf,
        /// The present-map.
        map: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The disk file was filled from another disk than the one given.
    #[error("{} was filled from another disk ({detail}): remove it and {}, or pick another path", path.display(), map.display())]
    OtherDisk {
        /// The disk file.
        path: PathBuf,
        /// Its present-map.
        map: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The chunk source describes no usable disk.
    #[error("{what} cannot back a lazy disk: {detail}")]
    BadSource {
        /// The source ([`ChunkSource::describe`](crate::ChunkSource::describe)).
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// A chunk could not be fetched (the server is gone, the chunk is
    /// corrupt...). The request that needed it fails; the next request
    /// that needs it tries again.
    #[error("{}: chunk {index} (disk bytes {offset}..{end}) could not be fetched: {source}", path.display())]
    Fetch {
        /// The disk file.
        path: PathBuf,
        /// The chunk's index.
        index: usize,
        /// Where the chunk starts on the disk.
        offset: u64,
        /// Where it ends (exclusive).
        end: u64,
        /// What the source failed with.
        source: SharedError,
    },
    /// A request reaches past the end of the disk.
    #[error("{}: {len} bytes at offset {offset} reach past the end of the disk ({size} bytes)", path.display())]
    OutOfRange {
        /// The disk file.
        path: PathBuf,
        /// The request's offset.
        offset: u64,
        /// The request's length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
}

impl LazyDiskError {
    /// The `map_err` for an I/O failure on the file at `path` while doing
    /// `what`: every file this crate opens reports its errors this way.
    pub(crate) fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| LazyDiskError::Io { path, what, source }
    }
}

/// What can go wrong starting an [`NbdServer`](crate::NbdServer).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket cannot be bound.
    #[error("{}: cannot listen for NBD clients: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another server is listening on the socket.
    #[error("{}: another NBD server is listening there: stop it or pick another socket path", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A thread or socket the server needs could not be set up.
    #[error("cannot start the NBD server's {what}: {source}")]
    Setup {
        /// What could not be set up.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}
