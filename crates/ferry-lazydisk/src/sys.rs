//! The few system calls std does not wrap: an advisory file lock, hole
//! punching, and waiting on two sockets at once.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

/// Takes an exclusive `flock` on `file` without waiting. `Ok(false)` if
/// another open file description holds it. The lock lasts as long as the
/// file is open.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock(2) on a descriptor we own (borrowed from a live File);
    // it touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Deallocates `len` bytes at `offset` (they then read as zeros), keeping
/// the file's size. Fails with `ErrorKind::Unsupported` where the file
/// system cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate(2) on a descriptor we own; it touches no memory of
    // ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, e))
        }
        _ => Err(e),
    }
}

/// Waits until one of `fds` is readable (or hung up), for at most
/// `timeout` (`None`: no limit). Returns which are ready.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs
        // that outlives the call; the descriptors are borrowed, so open.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Where the next data at or after `offset` starts (`lseek(SEEK_DATA)`),
/// `None` if only a hole follows. The lazy disk reads and writes with
/// `pread`/`pwrite`, so moving the shared file offset disturbs nobody.
pub(crate) fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    match seek(file, offset, libc::SEEK_DATA) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        other => other.map(Some),
    }
}

/// Where the hole at or after `offset` starts (`lseek(SEEK_HOLE)`); the
/// end of the file counts as a hole.
pub(crate) fn seek_hole(file: &File, offset: u64) -> io::Result<u64> {
    seek(file, offset, libc::SEEK_HOLE)
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: lseek(2) on a descriptor we own (borrowed from a live File);
    // it touches no memory of ours.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u64)
}
