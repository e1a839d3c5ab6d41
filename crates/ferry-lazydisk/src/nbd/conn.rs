//! One NBD client connection: the handshake, then requests read on this
//! thread and run by a few workers that write the replies.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, PoisonError};

use tracing::{debug, warn};

use super::proto::*;
use super::{NbdOptions, MAX_PAYLOAD};
use crate::disk::StoreError;
use crate::{LazyDisk, LazyDiskError};

/// Longest option accepted in the handshake (names are at most 4 KiB).
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Preferred block size advertised: a page. Smaller writes work, they are
/// a read-modify-write in the page cache.
const PREFERRED_BLOCK: u32 = 4096;

/// Serves one client until it disconnects, breaks the protocol, or the
/// server shuts the connection's reading side.
pub(super) fn serve(stream: UnixStream, disk: &LazyDisk, options: &NbdOptions, id: u64) {
    let result = handshake(&stream, disk, options).and_then(|go| {
        if go {
            debug!(connection = id, "NBD client in transmission");
            transmission(&stream, disk, options)
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => debug!(connection = id, "NBD client disconnected"),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            warn!(connection = id, "NBD client dropped: {e}")
        }
        Err(e) => debug!(connection = id, "NBD connection ended: {e}"),
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_u32(mut r: impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(mut r: impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn transmission_flags(options: &NbdOptions) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_CACHE;
    if options.read_only {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

/// Fixed newstyle negotiation. Returns whether the client entered
/// transmission (false: it aborted).
fn handshake(mut s: &UnixStream, disk: &LazyDisk, options: &NbdOptions) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(s)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {client:#x}")));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let name = options.export_name.as_bytes();
    let known = |asked: &[u8]| asked.is_empty() || asked == name;
    let flags = transmission_flags(options);
    loop {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("option magic {magic:#x}")));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            return Err(protocol(format!("option {option} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |kind: u32, data: &[u8]| option_reply(option, kind, data);
        let error = |kind: u32, msg: &str| option_reply(option, kind, msg.as_bytes());
        match option {
            OPT_EXPORT_NAME => {
                if !known(&data) {
                    // This option has no error reply: the protocol says
                    // to end the session.
                    return Err(protocol(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&disk.size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(true);
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = s.write_all(&reply(REP_ACK, &[]));
                return Ok(false);
            }
            OPT_LIST if !data.is_empty() => {
                s.write_all(&error(REP_ERR_INVALID, "NBD_OPT_LIST takes no data"))?
            }
            OPT_LIST => {
                let mut server = Vec::with_capacity(4 + name.len());
                server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                server.extend_from_slice(name);
                let mut out = reply(REP_SERVER, &server);
                out.extend(reply(REP_ACK, &[]));
                s.write_all(&out)?;
            }
            OPT_INFO | OPT_GO => {
                let Some((asked, infos)) = parse_info_request(&data) else {
                    s.write_all(&error(REP_ERR_INVALID, "malformed information request"))?;
                    continue;
                };
                if !known(asked) {
                    let msg = format!(
                        "no export {:?}: this server exports {:?}",
                        String::from_utf8_lossy(asked),
                        options.export_name
                    );
                    s.write_all(&error(REP_ERR_UNKNOWN, &msg))?;
                    continue;
                }
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&disk.size().to_be_bytes());
                export.extend_from_slice(&flags.to_be_bytes());
                let mut out = reply(REP_INFO, &export);
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend_from_slice(&1u32.to_be_bytes());
                    sizes.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                    sizes.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    out.extend(reply(REP_INFO, &sizes));
                }
                if infos.contains(&INFO_NAME) {
                    let mut n = INFO_NAME.to_be_bytes().to_vec();
                    n.extend_from_slice(name);
                    out.extend(reply(REP_INFO, &n));
                }
                out.extend(reply(REP_ACK, &[]));
                s.write_all(&out)?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_STARTTLS => s.write_all(&error(
                REP_ERR_UNSUP,
                "this server does not offer TLS (it listens on a local socket only)",
            ))?,
            // Structured replies, metadata contexts and anything newer:
            // the client falls back to simple replies.
            _ => s.write_all(&error(REP_ERR_UNSUP, "option not supported"))?,
        }
    }
}

/// A request read off the socket, with its payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// The transmission phase: reads requests here and hands them to workers.
fn transmission(stream: &UnixStream, disk: &LazyDisk, options: &NbdOptions) -> io::Result<()> {
    let writer = Mutex::new(stream.try_clone()?);
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    // A rendezvous channel: a request is read only when a worker is free,
    // which bounds the payloads held per connection.
    let (tx, rx) = mpsc::sync_channel::<Job>(0);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..options.workers_per_connection.max(1) {
            scope.spawn(|| worker(&rx, &writer, disk, options));
        }
        let result = read_requests(&mut reader, &tx);
        // Workers finish the requests already read, then stop.
        drop(tx);
        result
    })
}

fn read_requests(reader: &mut impl Read, tx: &SyncSender<Job>) -> io::Result<()> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            // The client hung up, or the server is stopping.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(req) = Request::parse(&header) else {
            return Err(protocol("a request with a wrong magic".into()));
        };
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                return Err(protocol(format!(
                    "a write of {} bytes (the maximum is {MAX_PAYLOAD})",
                    req.len
                )));
            }
            payload = vec![0u8; req.len as usize];
            reader.read_exact(&mut payload)?;
        }
        if req.kind == CMD_DISC {
            return Ok(());
        }
        if tx.send(Job { req, payload }).is_err() {
            return Ok(());
        }
    }
}

fn worker(
    rx: &Mutex<Receiver<Job>>,
    writer: &Mutex<UnixStream>,
    disk: &LazyDisk,
    options: &NbdOptions,
) {
    loop {
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        let cookie = job.req.cookie;
        let (error, data) = match execute(&job, disk, options) {
            Ok(data) => (0, data),
            Err(e) => (e, Vec::new()),
        };
        let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = w
            .write_all(&simple_reply(error, cookie))
            .and_then(|()| w.write_all(&data));
        if let Err(e) = sent {
            debug!("NBD reply not sent ({e}): closing the connection");
            // The reader stops too; the remaining requests still run.
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}

/// Runs one request; the data of a read, or an NBD error number.
fn execute(job: &Job, disk: &LazyDisk, options: &NbdOptions) -> Result<Vec<u8>, u32> {
    let Request {
        flags,
        kind,
        offset,
        len,
        ..
    } = job.req;
    let len64 = u64::from(len);
    let allowed = CMD_FLAG_FUA
        | if kind == CMD_WRITE_ZEROES {
            CMD_FLAG_NO_HOLE
        } else {
            0
        };
    if flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let fua = flags & CMD_FLAG_FUA != 0;
    let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && options.read_only {
        return Err(EPERM);
    }
    if kind == CMD_FLUSH {
        // Offset and length are reserved (zero) for a flush.
        return flush(disk).map(|()| Vec::new());
    }
    // Writes past the end are "no space", other requests "invalid".
    if offset
        .checked_add(len64)
        .is_none_or(|end| end > disk.size())
    {
        return Err(match kind {
            CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        });
    }
    let result = match kind {
        CMD_READ => {
            if len > MAX_PAYLOAD {
                return Err(EINVAL);
            }
            let mut buf = vec![0u8; len as usize];
            disk.read_at(&mut buf, offset).map(|()| buf)
        }
        CMD_WRITE => disk.write_at(&job.payload, offset).map(|()| Vec::new()),
        CMD_TRIM => disk.trim(offset, len64).map(|()| Vec::new()),
        CMD_WRITE_ZEROES => disk
            .write_zeroes(offset, len64, flags & CMD_FLAG_NO_HOLE == 0)
            .map(|()| Vec::new()),
        CMD_CACHE => disk.cache(offset, len64).map(|()| Vec::new()),
        _ => return Err(EINVAL),
    };
    let data = result.map_err(|e| errno(&e, kind))?;
    if fua && writes {
        flush(disk)?;
    }
    Ok(data)
}

fn flush(disk: &LazyDisk) -> Result<(), u32> {
    disk.flush().map_err(|e| errno(&e, CMD_FLUSH))
}

/// The NBD error for a failed request, logged unless the lazy disk has
/// reported it already (fetch failures) or it is the client's mistake.
fn errno(e: &LazyDiskError, kind: u16) -> u32 {
    let io_errno = |e: &io::Error| match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        _ => EIO,
    };
    match e {
        LazyDiskError::OutOfRange { .. } => EINVAL,
        LazyDiskError::Fetch { source, .. } => {
            debug!(command = kind, "NBD request failed: {e}");
            match source.downcast_ref::<StoreError>() {
                Some(StoreError(io)) => io_errno(io),
                None => EIO,
            }
        }
        LazyDiskError::Io { source, .. } => {
            warn!(command = kind, "NBD request failed: {e}");
            io_errno(source)
        }
        other => {
            warn!(command = kind, "NBD request failed: {other}");
            EIO
        }
    }
}
