//! [`LazyDisk`]: a VM's disk that is usable before it has arrived.
//!
//! The disk is a local sparse file of the full size plus one state per chunk:
//!
//! ```text
//!            fetch (on demand or prefetch)        ok
//!   Absent ───────────────────────────► Fetching ───► Present
//!     ▲  ▲                                 │  ▲          ▲
//!     │  └──── next request retries ─ Failed │           │
//!     │                                     │  whole-chunk write, write-zeroes
//!     └──── a whole-chunk write fails ◄─────┘  or trim of an absent chunk
//! ```
//!
//! A read needs its chunks present and fetches the absent ones first; a
//! write needs the chunks it covers only in part present (read-modify-write),
//! and takes the chunks it covers whole without fetching them. Writes go to
//! the local file only, never to the source. Exactly one fetch runs per
//! chunk: whoever finds a chunk `Fetching` waits for it. Background threads
//! fetch the remaining chunks in order, giving way to on-demand fetches.
//!
//! Invariant: while `absent_are_holes` holds, the bytes of a chunk that is
//! not present are holes in the file (zeros), so a fetched chunk's zero
//! blocks need not be written and the file stays as sparse as the disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::error::{LazyDiskError, SharedError};
use crate::present::{self, Identity, ReadError};
use crate::source::{ChunkSource, DynSource};
use crate::sys;

/// Granularity at which a fetched chunk's zero blocks are left as holes.
const BLOCK: usize = 4096;
/// First wait of a prefetch thread after a failed fetch; doubled up to
/// [`MAX_BACKOFF`] while fetches keep failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a [`LazyDisk`] fetches in the background and keeps its present-map.
#[derive(Debug, Clone)]
pub struct LazyDiskOptions {
    /// Start fetching the remaining chunks in the background at once. When
    /// false, only requests fetch, until [`LazyDisk::resume_prefetch`].
    pub prefetch: bool,
    /// Background fetches in flight at once. More hide the latency of a far
    /// registry; on-demand fetches always go first.
    pub prefetch_threads: usize,
    /// Most bytes per second (of chunk data) that background fetches take,
    /// so that a migration does not starve the link; `None`: no limit.
    pub prefetch_rate: Option<u64>,
    /// How often the present-map is written while chunks arrive (it is also
    /// written on flush, when the disk is complete and on drop).
    pub persist_interval: Duration,
}

impl Default for LazyDiskOptions {
    fn default() -> Self {
        LazyDiskOptions {
            prefetch: true,
            prefetch_threads: 2,
            prefetch_rate: None,
            persist_interval: Duration::from_secs(2),
        }
    }
}

/// Where one chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Not fetched yet.
    Absent,
    /// Being fetched (or wholly overwritten) right now.
    Fetching,
    /// Its bytes are in the local file.
    Present,
    /// The last fetch failed; like `Absent`, the next request retries.
    Failed,
}

/// A run of disk bytes that all read as zeros, or may not: what
/// [`LazyDisk::extents`] reports, so an NBD client can skip zero regions
/// without reading (or fetching) them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// They read as zeros (a hole in the file, or a chunk the source says
    /// is all zeros). `false` means "not known to be zeros".
    pub zero: bool,
}

/// The last fetch that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFailure {
    /// The chunk's index.
    pub index: usize,
    /// Where it starts on the disk.
    pub offset: u64,
    /// The whole error, one line.
    pub message: String,
}

/// A snapshot of a lazy disk's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyDiskStatus {
    /// Chunks in the disk.
    pub chunks_total: usize,
    /// Chunks whose bytes are in the local file (fetched, all-zero, written
    /// whole, or present from an earlier run).
    pub chunks_present: usize,
    /// Chunks fetched from the source by this lazy disk.
    pub chunks_fetched: u64,
    /// Bytes of chunk data fetched by this lazy disk (uncompressed).
    pub bytes_fetched: u64,
    /// Bytes the source moved (compressed, with protocol overhead), when it
    /// counts them.
    pub bytes_transferred: Option<u64>,
    /// Fetches that failed.
    pub fetch_failures: u64,
    /// Every chunk is present: the file is a plain raw image of the disk.
    pub complete: bool,
    /// Background fetching is paused.
    pub prefetch_paused: bool,
    /// The last failed fetch, until that chunk is fetched.
    pub last_error: Option<ChunkFailure>,
}

/// A disk that fills itself from a [`ChunkSource`] while it is used. Share
/// it between threads (an `Arc`); every method takes `&self`.
///
/// Dropping it stops the background threads (waiting for fetches in
/// flight) and writes the present-map.
pub struct LazyDisk {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyDisk")
            .field("path", &self.shared.path)
            .field("source", &self.shared.source.describe())
            .field("size", &self.shared.size)
            .finish()
    }
}

enum Slot {
    Absent,
    Fetching,
    Present,
    Failed(SharedError),
}

struct State {
    slots: Vec<Slot>,
    present: usize,
    /// On-demand fetches in flight: background fetching waits while any are.
    demand: usize,
    /// Where the background fetch looks for the next absent chunk.
    cursor: usize,
    paused: bool,
    stopping: bool,
    rate: Option<u64>,
    /// Earliest time the next background fetch may start under `rate`.
    next_slot: Instant,
    /// The present set changed since the present-map was last written.
    dirty: bool,
    chunks_fetched: u64,
    bytes_fetched: u64,
    failures: u64,
    last_error: Option<ChunkFailure>,
}

struct Shared {
    path: PathBuf,
    map_path: PathBuf,
    /// Holds the exclusive `flock` for as long as it is open.
    file: File,
    source: Box<dyn DynSource>,
    identity: Identity,
    size: u64,
    chunk_size: u64,
    /// See the module doc; cleared if holes cannot be punched.
    absent_are_holes: AtomicBool,
    state: Mutex<State>,
    /// Signalled on every change of `state`.
    changed: Condvar,
    /// One present-map write at a time.
    persisting: Mutex<()>,
}

/// Storing a fetched chunk in the local file failed.
#[derive(Debug, thiserror::Error)]
#[error("storing it in the disk file failed: {0}")]
pub(crate) struct StoreError(#[source] pub(crate) io::Error);

/// The source broke its contract.
#[derive(Debug, thiserror::Error)]
#[error("the source returned {got} bytes for a chunk of {expected}")]
struct WrongLength {
    got: usize,
    expected: u64,
}

impl LazyDisk {
    /// Opens the lazy disk at `path`, filled from `source`.
    ///
    /// If `path` does not exist it is created sparse, at the disk's full
    /// size, with its present-map `<path>.present` beside it (all-zero
    /// chunks are present from the start). If it exists, its present-map
    /// says which chunks are already there, and only the others are fetched.
    /// The file is locked (`flock`) while the lazy disk is open.
    ///
    /// # Errors
    /// [`LazyDiskError::BadSource`] for a source with impossible sizes;
    /// [`LazyDiskError::InUse`] if another lazy disk has the file open;
    /// [`LazyDiskError::NoPresentMap`], [`LazyDiskError::PresentMapCorrupt`]
    /// or [`LazyDiskError::OtherDisk`] for an existing file that cannot be
    /// resumed; [`LazyDiskError::Io`] otherwise.
    pub fn open(
        path: &Path,
        source: impl ChunkSource + 'static,
        options: LazyDiskOptions,
    ) -> Result<LazyDisk, LazyDiskError> {
        let source: Box<dyn DynSource> = Box::new(source);
        let (size, chunk_size, count) = (source.len(), source.chunk_size(), source.chunk_count());
        let bad = |detail: String| LazyDiskError::BadSource {
            what: source.describe(),
            detail,
        };
        if chunk_size == 0 && size > 0 {
            return Err(bad("its chunk size is 0".into()));
        }
        if chunk_size > 0 && size.div_ceil(chunk_size) != count as u64 {
            return Err(bad(format!(
                "{size} bytes in chunks of {chunk_size} are not {count} chunks"
            )));
        }
        if usize::try_from(chunk_size).is_err() {
            return Err(bad(format!(
                "chunks of {chunk_size} bytes do not fit in memory"
            )));
        }
        let identity = Identity {
            size,
            chunk_size,
            count: count as u64,
            digest: source.digest().to_string(),
        };
        let map_path = present::map_path(path);
        let io = LazyDiskError::io;
        let lock = |file: &File| match sys::try_lock_exclusive(file) {
            Ok(true) => Ok(()),
            Ok(false) => Err(LazyDiskError::InUse {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(io(path, "lock it")(e)),
        };

        let (file, mut present, fresh) = match OpenOptions::new().read(true).write(true).open(path)
        {
            Ok(file) => {
                lock(&file)?;
                let present = match present::read(&map_path, &identity) {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        return Err(LazyDiskError::NoPresentMap {
                            path: path.to_path_buf(),
                            map: map_path,
                        })
                    }
                    Err(ReadError::Io(e)) => return Err(io(&map_path, "read it")(e)),
                    Err(ReadError::Corrupt(detail)) => {
                        return Err(LazyDiskError::PresentMapCorrupt {
                            path: path.to_path_buf(),
                            map: map_path,
                            detail,
                        })
                    }
                    Err(ReadError::Other(detail)) => {
                        return Err(LazyDiskError::OtherDisk {
                            path: path.to_path_buf(),
                            map: map_path,
                            detail,
                        })
                    }
                };
                let len = file.metadata().map_err(io(path, "stat it"))?.len();
                if len != size {
                    return Err(LazyDiskError::OtherDisk {
                        path: path.to_path_buf(),
                        map: map_path,
                        detail: format!("it is {len} bytes, the disk {size}"),
                    });
                }
                (file, present, false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let present: Vec<bool> = (0..count).map(|i| source.is_zero(i)).collect();
                // The map first: a file without one is refused at the next
                // open, a map without a file is simply written again.
                present::write(&map_path, &identity, &present)
                    .map_err(io(&map_path, "write it"))?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(io(path, "create it"))?;
                lock(&file)?;
                file.set_len(size).map_err(io(path, "size it"))?;
                (file, present, true)
            }
            Err(e) => return Err(io(path, "open it")(e)),
        };

        let shared = Shared {
            path: path.to_path_buf(),
            map_path,
            file,
            source,
            identity,
            size,
            chunk_size,
            absent_are_holes: AtomicBool::new(true),
            state: Mutex::new(State {
                slots: Vec::new(),
                present: 0,
                demand: 0,
                cursor: 0,
                paused: !options.prefetch,
                stopping: false,
                rate: options.prefetch_rate.filter(|&r| r > 0),
                next_slot: Instant::now(),
                dirty: false,
                chunks_fetched: 0,
                bytes_fetched: 0,
                failures: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
            persisting: Mutex::new(()),
        };
        let mut dirty = false;
        if !fresh {
            // A chunk that was being fetched when the last run stopped may
            // be half written: make every absent chunk a hole again.
            if let Err(e) = shared.punch_absent(&present) {
                if e.kind() != io::ErrorKind::Unsupported {
                    return Err(io(path, "clear the chunks not fetched yet")(e));
                }
                warn!(disk = %path.display(), "the file system cannot punch holes: fetched chunks are written whole");
                shared.absent_are_holes.store(false, Ordering::Relaxed);
            }
            if shared.absent_are_holes.load(Ordering::Relaxed) {
                for (i, p) in present.iter_mut().enumerate() {
                    if !*p && shared.source.is_zero(i) {
                        *p = true;
                        dirty = true;
                    }
                }
            }
        }
        {
            let mut st = shared.lock();
            st.slots = present
                .iter()
                .map(|&p| if p { Slot::Present } else { Slot::Absent })
                .collect();
            st.present = present.iter().filter(|&&p| p).count();
            st.dirty = dirty;
        }
        let shared = Arc::new(shared);
        let present_now = shared.lock().present;
        info!(
            disk = %path.display(),
            source = %shared.source.describe(),
            "lazy disk of {size} bytes: {present_now} of {count} chunks present{}",
            if fresh { " (new file)" } else { "" }
        );

        let mut disk = LazyDisk {
            shared,
            threads: Vec::new(),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(io(path, "start a thread for it"))
        };
        for _ in 0..options.prefetch_threads.max(1) {
            let shared = disk.shared.clone();
            let t = spawn(
                "lazydisk-prefetch",
                Box::new(move || prefetch_loop(&shared)),
            )?;
            disk.threads.push(t);
        }
        let shared = disk.shared.clone();
        let interval = options.persist_interval.max(Duration::from_millis(10));
        let t = spawn(
            "lazydisk-persist",
            Box::new(move || persist_loop(&shared, interval)),
        )?;
        disk.threads.push(t);
        Ok(disk)
    }

    /// The local file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The present-map beside it (`<path>.present`).
    pub fn present_map_path(&self) -> &Path {
        &self.shared.map_path
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size
    }

    /// Size of a chunk (the last may be shorter).
    pub fn chunk_size(&self) -> u64 {
        self.shared.chunk_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.shared.identity.count as usize
    }

    /// The source in words.
    pub fn source(&self) -> String {
        self.shared.source.describe()
    }

    /// Reads `buf.len()` bytes at `offset`, fetching absent chunks first.
    ///
    /// # Errors
    /// [`LazyDiskError::OutOfRange`] past the end;
    /// [`LazyDiskError::Fetch`] if a chunk cannot be fetched;
    /// [`LazyDiskError::Io`] if the local file cannot be read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LazyDiskError> {
        let s = &self.shared;
        s.check(offset, buf.len() as u64)?;
        for index in s.chunks_of(offset, buf.len() as u64) {
            s.ensure(index)?;
        }
        s.file
            .read_exact_at(buf, offset)
            .map_err(|e| s.io_error("read it", e))
    }

    /// Writes `data` at `offset` into the local file (never to the source).
    /// Chunks the write covers only in part are fetched first; chunks it
    /// covers whole are not.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), LazyDiskError> {
        let s = &self.shared;
        s.check(offset, data.len() as u64)?;
        let claims = s.prepare_overwrite(offset, data.len() as u64)?;
        s.file
            .write_all_at(data, offset)
            .map_err(|e| s.io_error("write it", e))?;
        claims.commit();
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: by punching a hole when
    /// `allow_holes`, else by writing zeros (the space stays allocated).
    ///
    /// # Errors
    /// As [`write_at`](Self::write_at).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        allow_holes: bool,
    ) -> Result<(), LazyDiskError> {
        let s = &self.shared;
        s.check(offset, len)?;
        let claims = s.prepare_overwrite(offset, len)?;
        s.zero(offset, len, allow_holes)
            .map_err(|e| s.io_error("zero a range of it", e))?;
        claims.commit();
        Ok(())
    }

    /// Says that `len` bytes at `offset` are no longer needed (a discard):
    /// chunks it covers whole become present as holes without being
    /// fetched; present chunks lose the range's blocks. Their content is
    /// unspecified until written again, as for any discard.
    ///
    /// # Errors
    /// [`LazyDiskError::OutOfRange`] past the end; [`LazyDiskError::Io`] if
    /// punching a hole fails for another reason than lack of support.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        let s = &self.shared;
        s.check(offset, len)?;
        let end = offset + len;
        for index in s.chunks_of(offset, len) {
            let chunk = s.bounds(index);
            let whole = offset <= chunk.start && chunk.end <= end;
            let punch = if whole {
                if s.claim(index) {
                    let claims = Claims {
                        shared: s,
                        chunks: vec![index],
                    };
                    // An absent chunk's bytes are holes already, or stale
                    // bytes: either is fine after a discard.
                    ignore_unsupported(sys::punch_hole(
                        &s.file,
                        chunk.start,
                        chunk.end - chunk.start,
                    ))
                    .map_err(|e| s.io_error("punch a hole in it", e))?;
                    claims.commit();
                    continue;
                }
                chunk.clone()
            } else if s.state_of(index) == ChunkState::Present {
                offset.max(chunk.start)..end.min(chunk.end)
            } else {
                // Fetching a chunk to discard part of it would be waste.
                continue;
            };
            ignore_unsupported(sys::punch_hole(
                &s.file,
                punch.start,
                punch.end - punch.start,
            ))
            .map_err(|e| s.io_error("punch a hole in it", e))?;
        }
        Ok(())
    }

    /// Which parts of `len` bytes at `offset` are known to read as zeros,
    /// without fetching anything: the runs cover the range exactly, in
    /// order, and neighbours differ.
    ///
    /// A chunk not here yet is zeros if the source says so
    /// ([`ChunkSource::is_zero`]), else "maybe data" (finding out would mean
    /// fetching it). A chunk here is zeros where the file has holes
    /// (`SEEK_HOLE`), which is where zero chunks, zero blocks of fetched
    /// chunks, trims and write-zeroes leave it. Where the file system
    /// cannot tell, present chunks are reported as data, which is always
    /// correct. A chunk being fetched or overwritten is reported as data.
    ///
    /// # Errors
    /// [`LazyDiskError::OutOfRange`] past the end.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, LazyDiskError> {
        let s = &self.shared;
        s.check(offset, len)?;
        let chunks = s.chunks_of(offset, len);
        let states: Vec<ChunkState> = {
            let st = s.lock();
            st.slots[chunks.clone()].iter().map(Slot::state).collect()
        };
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |len: u64, zero: bool| match out.last_mut() {
            Some(last) if last.zero == zero => last.len += len,
            _ if len > 0 => out.push(Extent { len, zero }),
            _ => {}
        };
        for (index, state) in chunks.zip(states) {
            let b = s.bounds(index);
            let (from, to) = (b.start.max(offset), b.end.min(end));
            match state {
                ChunkState::Present => {
                    for (len, zero) in s.file_extents(from, to) {
                        push(len, zero);
                    }
                }
                ChunkState::Absent | ChunkState::Failed => push(to - from, s.source.is_zero(index)),
                ChunkState::Fetching => push(to - from, false),
            }
        }
        Ok(out)
    }

    /// Fetches the chunks under `len` bytes at `offset` now, as a read
    /// would, without reading them.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at), without the local read.
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        let s = &self.shared;
        s.check(offset, len)?;
        for index in s.chunks_of(offset, len) {
            s.ensure(index)?;
        }
        Ok(())
    }

    /// Makes everything written so far durable: the file's data, and the
    /// present-map when chunks arrived since it was last written (else a
    /// restart would fetch those chunks again over the guest's writes).
    ///
    /// # Errors
    /// [`LazyDiskError::Io`] if syncing or writing fails.
    pub fn flush(&self) -> Result<(), LazyDiskError> {
        let s = &self.shared;
        if !s.persist()? {
            s.file.sync_data().map_err(|e| s.io_error("sync it", e))?;
        }
        Ok(())
    }

    /// Writes the present-map now if it changed (after syncing the file, so
    /// that no chunk is recorded before its bytes are on disk).
    ///
    /// # Errors
    /// [`LazyDiskError::Io`] if syncing or writing fails.
    pub fn persist(&self) -> Result<(), LazyDiskError> {
        self.shared.persist().map(|_| ())
    }

    /// The state of chunk `index`, `None` past the end.
    pub fn chunk_state(&self, index: usize) -> Option<ChunkState> {
        let st = self.shared.lock();
        st.slots.get(index).map(Slot::state)
    }

    /// Progress and the last failure.
    pub fn status(&self) -> LazyDiskStatus {
        let transferred = self.shared.source.bytes_transferred();
        let st = self.shared.lock();
        LazyDiskStatus {
            chunks_total: st.slots.len(),
            chunks_present: st.present,
            chunks_fetched: st.chunks_fetched,
            bytes_fetched: st.bytes_fetched,
            bytes_transferred: transferred,
            fetch_failures: st.failures,
            complete: st.present == st.slots.len(),
            prefetch_paused: st.paused,
            last_error: st.last_error.clone(),
        }
    }

    /// The last failed fetch, until that chunk is fetched.
    pub fn last_error(&self) -> Option<ChunkFailure> {
        self.shared.lock().last_error.clone()
    }

    /// Whether every chunk is present.
    pub fn is_complete(&self) -> bool {
        let st = self.shared.lock();
        st.present == st.slots.len()
    }

    /// Waits until every chunk is present, for at most `timeout`. Returns
    /// whether it is.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        let mut st = s.lock();
        while st.present < st.slots.len() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = s
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Stops background fetching (fetches in flight finish).
    pub fn pause_prefetch(&self) {
        self.shared.update(|st| st.paused = true);
    }

    /// Starts or resumes background fetching.
    pub fn resume_prefetch(&self) {
        self.shared.update(|st| st.paused = false);
    }

    /// Limits background fetching to `bytes_per_sec` of chunk data
    /// (`None`: no limit).
    pub fn set_prefetch_rate(&self, bytes_per_sec: Option<u64>) {
        self.shared.update(|st| {
            st.rate = bytes_per_sec.filter(|&r| r > 0);
            st.next_slot = Instant::now();
        });
    }
}

impl Drop for LazyDisk {
    fn drop(&mut self) {
        self.shared.update(|st| st.stopping = true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Err(e) = self.shared.persist() {
            warn!("{e}");
        }
    }
}

impl Slot {
    fn state(&self) -> ChunkState {
        match self {
            Slot::Absent => ChunkState::Absent,
            Slot::Fetching => ChunkState::Fetching,
            Slot::Present => ChunkState::Present,
            Slot::Failed(_) => ChunkState::Failed,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(st)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state and wakes every waiter.
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    fn state_of(&self, index: usize) -> ChunkState {
        self.lock().slots[index].state()
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> LazyDiskError {
        LazyDiskError::io(&self.path, what)(source)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), LazyDiskError> {
        check_range(&self.path, self.size, offset, len)
    }

    /// The chunks under `len` bytes at `offset` (a checked range).
    fn chunks_of(&self, offset: u64, len: u64) -> Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        first as usize..last as usize + 1
    }

    /// The disk bytes of chunk `index`.
    fn bounds(&self, index: usize) -> Range<u64> {
        let start = index as u64 * self.chunk_size;
        start..(start + self.chunk_size).min(self.size)
    }

    fn fetch_error(&self, index: usize, source: SharedError) -> LazyDiskError {
        let b = self.bounds(index);
        LazyDiskError::Fetch {
            path: self.path.clone(),
            index,
            offset: b.start,
            end: b.end,
            source,
        }
    }

    /// Makes chunk `index` present, fetching it unless it is or another
    /// thread is fetching it (then waiting for that fetch, and failing
    /// with its error if it fails).
    fn ensure(&self, index: usize) -> Result<(), LazyDiskError> {
        let mut st = self.lock();
        let mut waited = false;
        loop {
            match &st.slots[index] {
                Slot::Present => return Ok(()),
                Slot::Fetching => {
                    waited = true;
                    st = self.wait(st);
                }
                Slot::Failed(e) if waited => return Err(self.fetch_error(index, e.clone())),
                Slot::Absent | Slot::Failed(_) => break,
            }
        }
        st.slots[index] = Slot::Fetching;
        st.demand += 1;
        // Background fetching carries on after what the guest touched:
        // a guest that reads one chunk tends to read the next.
        st.cursor = (index + 1) % st.slots.len();
        drop(st);
        self.fetch_and_record(index, true)
    }

    /// Takes chunk `index` for a caller that will overwrite it whole:
    /// `true` if it was absent (it is now `Fetching`, to be committed or
    /// released through [`Claims`]), `false` if it is present.
    fn claim(&self, index: usize) -> bool {
        let mut st = self.lock();
        loop {
            match st.slots[index] {
                Slot::Present => return false,
                Slot::Fetching => st = self.wait(st),
                Slot::Absent | Slot::Failed(_) => {
                    st.slots[index] = Slot::Fetching;
                    return true;
                }
            }
        }
    }

    /// Gets the chunks under a write ready: those covered in part are
    /// fetched, those covered whole are claimed. Chunks are taken in
    /// ascending order, so two writes never wait for each other in a cycle.
    fn prepare_overwrite(&self, offset: u64, len: u64) -> Result<Claims<'_>, LazyDiskError> {
        let mut claims = Claims {
            shared: self,
            chunks: Vec::new(),
        };
        let end = offset + len;
        for index in self.chunks_of(offset, len) {
            let chunk = self.bounds(index);
            if offset <= chunk.start && chunk.end <= end {
                if self.claim(index) {
                    claims.chunks.push(index);
                }
            } else {
                self.ensure(index)?;
            }
        }
        Ok(claims)
    }

    /// Fetches chunk `index` (already marked `Fetching` by the caller),
    /// stores it, and records the outcome.
    fn fetch_and_record(&self, index: usize, demand: bool) -> Result<(), LazyDiskError> {
        let started = Instant::now();
        let result = self.fetch_into_file(index);
        let mut st = self.lock();
        if demand {
            st.demand -= 1;
        }
        let (outcome, complete) = match result {
            Ok(bytes) => {
                if bytes > 0 {
                    st.chunks_fetched += 1;
                    st.bytes_fetched += bytes;
                }
                if st.last_error.as_ref().is_some_and(|f| f.index == index) {
                    st.last_error = None;
                }
                let complete = mark_present(&mut st, index);
                debug!(
                    disk = %self.path.display(),
                    chunk = index,
                    demand,
                    ms = started.elapsed().as_millis() as u64,
                    "chunk fetched"
                );
                (Ok(()), complete)
            }
            Err(e) => {
                st.slots[index] = Slot::Failed(e.clone());
                st.failures += 1;
                let err = self.fetch_error(index, e);
                st.last_error = Some(ChunkFailure {
                    index,
                    offset: self.bounds(index).start,
                    message: err.to_string(),
                });
                error!(disk = %self.path.display(), chunk = index, demand, "{err}");
                (Err(err), false)
            }
        };
        drop(st);
        self.changed.notify_all();
        if complete {
            self.completed();
        }
        outcome
    }

    /// Called once, by whoever made the last chunk present.
    fn completed(&self) {
        info!(disk = %self.path.display(), "every chunk is present: the disk is complete");
        if let Err(e) = self.persist() {
            warn!("{e}");
        }
    }

    /// Fetches chunk `index` and writes it into the file; returns the bytes
    /// fetched (0 for a zero chunk, which needs no fetch).
    fn fetch_into_file(&self, index: usize) -> Result<u64, SharedError> {
        let chunk = self.bounds(index);
        let len = chunk.end - chunk.start;
        let holes = self.absent_are_holes.load(Ordering::Relaxed);
        if self.source.is_zero(index) {
            if !holes {
                self.zero(chunk.start, len, true)
                    .map_err(|e| Arc::new(StoreError(e)) as SharedError)?;
            }
            return Ok(0);
        }
        let data = self.source.fetch(index)?;
        if data.len() as u64 != len {
            return Err(Arc::new(WrongLength {
                got: data.len(),
                expected: len,
            }));
        }
        self.store(chunk.start, &data, holes)
            .map_err(|e| Arc::new(StoreError(e)) as SharedError)?;
        Ok(len)
    }

    /// Writes `data` at `start`; with `holes`, skips its all-zero blocks
    /// (they are holes already), so the file stays sparse.
    fn store(&self, start: u64, data: &[u8], holes: bool) -> io::Result<()> {
        if !holes {
            return self.file.write_all_at(data, start);
        }
        let block_at = |i: usize| &data[i..(i + BLOCK).min(data.len())];
        let mut i = 0;
        while i < data.len() {
            if is_zero(block_at(i)) {
                i += BLOCK;
                continue;
            }
            let mut j = i + BLOCK;
            while j < data.len() && !is_zero(block_at(j)) {
                j += BLOCK;
            }
            let j = j.min(data.len());
            self.file.write_all_at(&data[i..j], start + i as u64)?;
            i = j;
        }
        Ok(())
    }

    /// Zeros `len` bytes at `offset` (see [`zero_range`]).
    fn zero(&self, offset: u64, len: u64, allow_holes: bool) -> io::Result<()> {
        zero_range(&self.file, offset, len, allow_holes)
    }

    /// The holes and data of the file between `from` and `to` (see
    /// [`file_extents`]).
    fn file_extents(&self, from: u64, to: u64) -> Vec<(u64, bool)> {
        file_extents(&self.file, &self.path, from, to)
    }

    /// Punches a hole over every run of absent chunks.
    fn punch_absent(&self, present: &[bool]) -> io::Result<()> {
        let mut i = 0;
        while i < present.len() {
            if present[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < present.len() && !present[j] {
                j += 1;
            }
            let start = self.bounds(i).start;
            sys::punch_hole(&self.file, start, self.bounds(j - 1).end - start)?;
            i = j;
        }
        Ok(())
    }

    /// Writes the present-map if it changed; returns whether it did (then
    /// the file was synced too).
    fn persist(&self) -> Result<bool, LazyDiskError> {
        let _one = self
            .persisting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let present: Vec<bool> = {
            let mut st = self.lock();
            if !st.dirty {
                return Ok(false);
            }
            st.dirty = false;
            st.slots
                .iter()
                .map(|s| matches!(s, Slot::Present))
                .collect()
        };
        // Chunks are stored before they are marked present, so syncing
        // after taking the snapshot makes every chunk in it durable.
        let result = self
            .file
            .sync_data()
            .map_err(|e| self.io_error("sync it", e))
            .and_then(|()| {
                present::write(&self.map_path, &self.identity, &present)
                    .map_err(LazyDiskError::io(&self.map_path, "write it"))
            });
        if result.is_err() {
            self.lock().dirty = true;
        }
        result.map(|()| true)
    }
}

/// Marks chunk `index` present; returns whether that completed the disk.
fn mark_present(st: &mut State, index: usize) -> bool {
    debug_assert!(!matches!(st.slots[index], Slot::Present));
    st.slots[index] = Slot::Present;
    st.present += 1;
    st.dirty = true;
    st.present == st.slots.len()
}

/// Chunks taken by a caller that overwrites them whole. Committing marks
/// them present; dropping without committing (the write failed) returns
/// them to absent, their bytes punched out again.
struct Claims<'a> {
    shared: &'a Shared,
    chunks: Vec<usize>,
}

impl Claims<'_> {
    fn commit(mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let s = self.shared;
        let mut st = s.lock();
        let mut complete = false;
        for index in self.chunks.drain(..) {
            complete |= mark_present(&mut st, index);
        }
        drop(st);
        s.changed.notify_all();
        if complete {
            s.completed();
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let s = self.shared;
        for &index in &self.chunks {
            let b = s.bounds(index);
            if sys::punch_hole(&s.file, b.start, b.end - b.start).is_err() {
                // The chunk may hold part of the failed write: a later
                // fetch must write it whole.
                s.absent_are_holes.store(false, Ordering::Relaxed);
            }
        }
        s.update(|st| {
            for &index in &self.chunks {
                st.slots[index] = Slot::Absent;
            }
        });
    }
}

pub(crate) fn ignore_unsupported(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        other => other,
    }
}

/// `len` bytes at `offset` of a disk of `size` bytes (the file at `path`)
/// lie within it.
pub(crate) fn check_range(
    path: &Path,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<(), LazyDiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(LazyDiskError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

/// Zeros `len` bytes at `offset` of `file`: a hole if allowed and
/// supported, else written zeros.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, allow_holes: bool) -> io::Result<()> {
    if allow_holes {
        match sys::punch_hole(file, offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            other => return other,
        }
    }
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The holes (zero: true) and data of `file` (at `path`, for the log)
/// between `from` and `to`, as `(len, zero)` runs; all data if the file
/// system cannot say.
pub(crate) fn file_extents(file: &File, path: &Path, from: u64, to: u64) -> Vec<(u64, bool)> {
    let mut runs = Vec::new();
    let mut at = from;
    while at < to {
        let data = match sys::seek_data(file, at) {
            Ok(d) => d.map_or(to, |d| d.min(to)),
            Err(e) => {
                debug!(disk = %path.display(), "SEEK_DATA failed ({e}): reporting data");
                runs.push((to - at, false));
                return runs;
            }
        };
        if data > at {
            runs.push((data - at, true));
            at = data;
            continue;
        }
        let hole = match sys::seek_hole(file, at) {
            Ok(h) => h.clamp(at + 1, to),
            Err(e) => {
                debug!(disk = %path.display(), "SEEK_HOLE failed ({e}): reporting data");
                to
            }
        };
        runs.push((hole - at, false));
        at = hole;
    }
    runs
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed blocks lets the compiler vectorise.
    let mut blocks = data.chunks_exact(64);
    for b in blocks.by_ref() {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// A background fetch thread: takes the next absent chunk after the cursor
/// whenever no on-demand fetch is in flight and prefetching is not paused.
fn prefetch_loop(s: &Shared) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let index = {
            let mut st = s.lock();
            loop {
                if st.stopping || st.present == st.slots.len() {
                    return;
                }
                if !st.paused && st.demand == 0 {
                    if let Some(i) = next_candidate(&st) {
                        st.slots[i] = Slot::Fetching;
                        st.cursor = (i + 1) % st.slots.len();
                        break i;
                    }
                }
                st = s.wait(st);
            }
        };
        let started = Instant::now();
        match s.fetch_and_record(index, false) {
            Ok(()) => {
                backoff = FIRST_BACKOFF;
                let bytes = {
                    let b = s.bounds(index);
                    b.end - b.start
                };
                pace(s, started, bytes);
            }
            Err(_) => {
                rest_until(s, Instant::now() + backoff, |_| true);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The first chunk at or after the cursor (wrapping) that needs fetching.
fn next_candidate(st: &State) -> Option<usize> {
    let n = st.slots.len();
    (0..n)
        .map(|k| (st.cursor + k) % n)
        .find(|&i| matches!(st.slots[i], Slot::Absent | Slot::Failed(_)))
}

/// Under a rate limit, waits until `bytes` fetched from `started` on fit it.
fn pace(s: &Shared, started: Instant, bytes: u64) {
    let until = {
        let mut st = s.lock();
        let Some(rate) = st.rate else { return };
        let slot = st.next_slot.max(started) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        st.next_slot = slot;
        slot
    };
    // A new rate (set_prefetch_rate) moves `next_slot` back: stop resting.
    rest_until(s, until, |st| st.next_slot >= until);
}

/// Sleeps until `until`, or until the disk stops or `keep` no longer holds.
fn rest_until(s: &Shared, until: Instant, keep: impl Fn(&State) -> bool) {
    let mut st = s.lock();
    loop {
        let now = Instant::now();
        if st.stopping || now >= until || !keep(&st) {
            return;
        }
        st = s
            .changed
            .wait_timeout(st, until - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Writes the present-map every `interval` while it changes.
fn persist_loop(s: &Shared, interval: Duration) {
    let mut next = Instant::now() + interval;
    let mut st = s.lock();
    loop {
        if st.stopping {
            return;
        }
        let now = Instant::now();
        if now < next {
            st = s
                .changed
                .wait_timeout(st, next - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        next = now + interval;
        if st.dirty {
            drop(st);
            if let Err(e) = s.persist() {
                warn!("{e}");
            }
            st = s.lock();
        }
    }
}
