//! One NBD client connection: the handshake, then requests read on this
//! thread and run by a few workers that write the replies.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, PoisonError};

use tracing::{debug, warn};

use super::proto::*;
use super::{NbdOptions, MAX_PAYLOAD};
use crate::disk::StoreError;
use crate::{Export, Extent, LazyDiskError};

/// Longest option accepted in the handshake (names are at most 4 KiB).
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Preferred block size advertised: a page. Smaller writes work, they are
/// a read-modify-write in the page cache.
const PREFERRED_BLOCK: u32 = 4096;
/// Context ID of `base:allocation` once selected (any value would do).
const ALLOCATION_ID: u32 = 1;
/// Most extents in one block status reply, as the protocol asks; the
/// client asks again from where the reply stops.
const MAX_EXTENTS: usize = 1 << 20;

/// What the client negotiated, for the transmission phase.
#[derive(Debug, Clone, Copy, Default)]
struct Session {
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    structured: bool,
    /// `base:allocation` is selected, so BLOCK_STATUS may be asked.
    allocation: bool,
}

/// A connected stream an NBD client talks on: a Unix socket (QEMU on this
/// host) or a TCP connection (a peer's engine, on a connection ferry
/// opened and authenticated).
pub trait NbdStream: Read + Write + Send + Sized + 'static {
    /// Another handle on the same connection.
    ///
    /// # Errors
    /// As `dup(2)`.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts down part or all of the connection.
    ///
    /// # Errors
    /// As `shutdown(2)`.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl NbdStream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

impl NbdStream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

/// Serves one client until it disconnects, breaks the protocol, or the
/// server shuts the connection's reading side.
pub(super) fn serve<S: NbdStream>(mut stream: S, disk: &dyn Export, options: &NbdOptions, id: u64) {
    let result = handshake(&mut stream, disk.size(), options).and_then(|go| match go {
        Some(session) => {
            debug!(connection = id, ?session, "NBD client in transmission");
            transmission(&stream, disk, options, session)
        }
        None => Ok(()),
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

/// Fixed newstyle negotiation with the client on `s`, for an export of
/// `size` bytes. Returns what the client negotiated if it entered
/// transmission (`None`: it aborted).
fn handshake<S: Read + Write>(
    mut s: S,
    size: u64,
    options: &NbdOptions,
) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(&mut s)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {client:#x}")));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let name = options.export_name.as_bytes();
    let known = |asked: &[u8]| asked.is_empty() || asked == name;
    let flags = transmission_flags(options);
    let mut session = Session::default();
    loop {
        let magic = read_u64(&mut s)?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("option magic {magic:#x}")));
        }
        let option = read_u32(&mut s)?;
        let len = read_u32(&mut s)?;
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
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(Some(session));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = s.write_all(&reply(REP_ACK, &[]));
                return Ok(None);
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
                export.extend_from_slice(&size.to_be_bytes());
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
                    return Ok(Some(session));
                }
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => s.write_all(&error(
                REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            ))?,
            OPT_STRUCTURED_REPLY => {
                session.structured = true;
                s.write_all(&reply(REP_ACK, &[]))?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // A set replaces the selection even when it fails.
                    session.allocation = false;
                }
                let Some((asked, queries)) = parse_meta_request(&data) else {
                    s.write_all(&error(
                        REP_ERR_INVALID,
                        "malformed metadata context request",
                    ))?;
                    continue;
                };
                if set && !session.structured {
                    s.write_all(&error(
                        REP_ERR_INVALID,
                        "negotiate structured replies before metadata contexts",
                    ))?;
                    continue;
                }
                if !known(asked) {
                    let msg = format!(
                        "no export {:?}: this server exports {:?}",
                        String::from_utf8_lossy(asked),
                        options.export_name
                    );
                    s.write_all(&error(REP_ERR_UNKNOWN, &msg))?;
                    continue;
                }
                // `base:allocation` is the only context. Listing takes
                // the `base:` wildcard and no queries at all as "every
                // context"; other namespaces and leaves are ignored.
                let exact = |q: &&[u8]| *q == BASE_ALLOCATION.as_bytes();
                let found = if set {
                    queries.iter().any(exact)
                } else {
                    queries.is_empty() || queries.iter().any(|q| exact(q) || *q == b"base:")
                };
                let mut out = Vec::new();
                if found {
                    let id = if set { ALLOCATION_ID } else { 0 };
                    let mut context = id.to_be_bytes().to_vec();
                    context.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    out.extend(reply(REP_META_CONTEXT, &context));
                    session.allocation |= set;
                }
                out.extend(reply(REP_ACK, &[]));
                s.write_all(&out)?;
            }
            OPT_STARTTLS => s.write_all(&error(
                REP_ERR_UNSUP,
                "this server does not offer TLS (it listens on a local socket only)",
            ))?,
            // Extended headers and anything newer: the client does
            // without.
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
fn transmission<S: NbdStream>(
    stream: &S,
    disk: &dyn Export,
    options: &NbdOptions,
    session: Session,
) -> io::Result<()> {
    let writer = Mutex::new(stream.try_clone()?);
    let mut reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
    // A rendezvous channel: a request is read only when a worker is free,
    // which bounds the payloads held per connection.
    let (tx, rx) = mpsc::sync_channel::<Job>(0);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..options.workers_per_connection.max(1) {
            scope.spawn(|| worker(&rx, &writer, disk, options, session));
        }
        let result = read_requests(&mut reader, |job| tx.send(job).is_ok());
        // Workers finish the requests already read, then stop.
        drop(tx);
        result
    })
}

/// Reads requests (and the payloads of writes) and hands each to `run`
/// until the client disconnects or `run` returns false.
fn read_requests(reader: &mut impl Read, mut run: impl FnMut(Job) -> bool) -> io::Result<()> {
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
            // Read into uninitialised capacity: zeroing a buffer the
            // payload overwrites cost a pass over every byte written.
            let len = req.len as usize;
            payload = Vec::with_capacity(len);
            let got = reader.by_ref().take(len as u64).read_to_end(&mut payload)?;
            if got < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if req.kind == CMD_DISC {
            return Ok(());
        }
        if !run(Job { req, payload }) {
            return Ok(());
        }
    }
}

fn worker<S: NbdStream>(
    rx: &Mutex<Receiver<Job>>,
    writer: &Mutex<S>,
    disk: &dyn Export,
    options: &NbdOptions,
    session: Session,
) {
    loop {
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        let result = execute(&job, disk, options, session);
        let reply = if session.structured {
            structured_reply(&job.req, result)
        } else {
            simple(job.req.cookie, result)
        };
        let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = reply.iter().try_for_each(|part| w.write_all(part));
        if let Err(e) = sent {
            debug!("NBD reply not sent ({e}): closing the connection");
            // The reader stops too; the remaining requests still run.
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}

/// What a request answers with when it succeeds.
enum Answer {
    /// Nothing (writes, flush, trim...).
    Done,
    /// The bytes of a read.
    Data(Vec<u8>),
    /// Extents of `base:allocation`, for BLOCK_STATUS.
    Extents(Vec<Extent>),
}

/// A simple reply, in parts to write one after the other (the data of a
/// read is not copied). Without structured replies there are no extents:
/// BLOCK_STATUS needs a metadata context, which needs structured replies.
fn simple(cookie: u64, result: Result<Answer, u32>) -> Vec<Vec<u8>> {
    match result {
        Ok(Answer::Data(data)) => vec![simple_reply(0, cookie).to_vec(), data],
        Ok(_) => vec![simple_reply(0, cookie).to_vec()],
        Err(e) => vec![simple_reply(e, cookie).to_vec()],
    }
}

/// A structured reply: always a single chunk, flagged DONE, since each
/// request is answered whole once it has run.
fn structured_reply(req: &Request, result: Result<Answer, u32>) -> Vec<Vec<u8>> {
    let chunk = |kind: u16, payload: Vec<u8>| {
        let head = structured_header(REPLY_FLAG_DONE, kind, req.cookie, payload.len() as u32);
        vec![head.to_vec(), payload]
    };
    match result {
        Ok(Answer::Data(data)) if !data.is_empty() => {
            let mut payload = Vec::with_capacity(8 + data.len());
            payload.extend_from_slice(&req.offset.to_be_bytes());
            payload.extend_from_slice(&data);
            chunk(REPLY_TYPE_OFFSET_DATA, payload)
        }
        Ok(Answer::Extents(extents)) => {
            let mut payload = Vec::with_capacity(4 + 8 * extents.len());
            payload.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
            for e in extents {
                let flags = if e.zero { STATE_HOLE | STATE_ZERO } else { 0 };
                // Extents lie within the request, whose length is a u32.
                payload.extend_from_slice(&(e.len as u32).to_be_bytes());
                payload.extend_from_slice(&flags.to_be_bytes());
            }
            chunk(REPLY_TYPE_BLOCK_STATUS, payload)
        }
        // A zero-length read has no data to send: OFFSET_DATA needs a byte.
        Ok(_) => chunk(REPLY_TYPE_NONE, Vec::new()),
        Err(e) => {
            let mut payload = e.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u16.to_be_bytes());
            chunk(REPLY_TYPE_ERROR, payload)
        }
    }
}

/// Whether a request may run on an export of `size` bytes, before it
/// touches the disk: `Err` is the NBD error number it gets.
fn check(req: &Request, size: u64, options: &NbdOptions, session: Session) -> Result<(), u32> {
    let Request {
        flags,
        kind,
        offset,
        len,
        ..
    } = *req;
    let allowed = CMD_FLAG_FUA
        | match kind {
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && options.read_only {
        return Err(EPERM);
    }
    if kind == CMD_FLUSH {
        // Offset and length are reserved (zero) for a flush.
        return Ok(());
    }
    // Writes past the end are "no space", other requests "invalid".
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > size)
    {
        return Err(match kind {
            CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        });
    }
    match kind {
        CMD_READ if len > MAX_PAYLOAD => Err(EINVAL),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE => Ok(()),
        // Without a selected context (or with nothing to describe) the
        // protocol has no answer to give.
        CMD_BLOCK_STATUS if !session.allocation || len == 0 => Err(EINVAL),
        CMD_BLOCK_STATUS => Ok(()),
        _ => Err(EINVAL),
    }
}

/// Runs one request; what it answers, or an NBD error number.
fn execute(
    job: &Job,
    disk: &dyn Export,
    options: &NbdOptions,
    session: Session,
) -> Result<Answer, u32> {
    check(&job.req, disk.size(), options, session)?;
    let Request {
        flags,
        kind,
        offset,
        len,
        ..
    } = job.req;
    let len64 = u64::from(len);
    let fua = flags & CMD_FLAG_FUA != 0;
    let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if kind == CMD_FLUSH {
        return flush(disk).map(|()| Answer::Done);
    }
    let done = |()| Answer::Done;
    let result = match kind {
        CMD_READ => {
            let mut buf = vec![0u8; len as usize];
            disk.read_at(&mut buf, offset).map(|()| Answer::Data(buf))
        }
        CMD_WRITE => disk.write_at(&job.payload, offset).map(done),
        CMD_TRIM => disk.trim(offset, len64).map(done),
        CMD_WRITE_ZEROES => disk
            .write_zeroes(offset, len64, flags & CMD_FLAG_NO_HOLE == 0)
            .map(done),
        CMD_CACHE => disk.cache(offset, len64).map(done),
        CMD_BLOCK_STATUS => disk.extents(offset, len64).map(|mut extents| {
            let keep = if flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            extents.truncate(keep);
            Answer::Extents(extents)
        }),
        _ => return Err(EINVAL),
    };
    let data = result.map_err(|e| errno(&e, kind))?;
    if fua && writes {
        flush(disk)?;
    }
    Ok(data)
}

fn flush(disk: &dyn Export) -> Result<(), u32> {
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

/// One request as [`replay_client`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedRequest {
    /// The command (`NBD_CMD_*`).
    pub command: u16,
    /// Its flags.
    pub flags: u16,
    /// Where on the export.
    pub offset: u64,
    /// How many bytes.
    pub len: u32,
    /// Bytes of payload read with it (a write's data).
    pub payload: usize,
    /// 0 if the server would run it, else the NBD error it would answer.
    pub verdict: u32,
}

/// What a client's bytes come to on the server, without a disk or a socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientReplay {
    /// The client finished the handshake and entered transmission.
    pub transmission: bool,
    /// It negotiated structured replies.
    pub structured: bool,
    /// It selected the `base:allocation` context.
    pub allocation: bool,
    /// Bytes the server sent during the handshake.
    pub handshake_reply: usize,
    /// The requests read in transmission, in order.
    pub requests: Vec<ReplayedRequest>,
    /// Why the server would drop the client, if it would (a protocol error;
    /// bytes that end early are a disconnect, not an error).
    pub error: Option<String>,
}

/// Decodes `input` as everything a client sends to an [`NbdServer`]
/// exporting `size` bytes with `options`: the handshake, then requests,
/// each checked as the server checks it before it would touch the disk.
/// This is all the parsing the server does, reachable without a socket,
/// for tests and the fuzzer (`fuzz/`, target `nbd`).
///
/// [`NbdServer`]: super::NbdServer
pub fn replay_client(input: &[u8], size: u64, options: &NbdOptions) -> ClientReplay {
    /// The client's bytes to read, the server's answers counted.
    struct Wire<'a> {
        input: &'a [u8],
        written: usize,
    }
    impl Read for Wire<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Wire<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut wire = Wire { input, written: 0 };
    let mut replay = ClientReplay::default();
    let ended = |e: io::Error| (e.kind() != io::ErrorKind::UnexpectedEof).then(|| e.to_string());
    let session = match handshake(&mut wire, size, options) {
        Ok(Some(session)) => session,
        Ok(None) => {
            replay.handshake_reply = wire.written;
            return replay;
        }
        Err(e) => {
            replay.handshake_reply = wire.written;
            replay.error = ended(e);
            return replay;
        }
    };
    replay.handshake_reply = wire.written;
    replay.transmission = true;
    replay.structured = session.structured;
    replay.allocation = session.allocation;
    let mut requests = Vec::new();
    let result = read_requests(&mut wire.input, |job| {
        requests.push(ReplayedRequest {
            command: job.req.kind,
            flags: job.req.flags,
            offset: job.req.offset,
            len: job.req.len,
            payload: job.payload.len(),
            verdict: check(&job.req, size, options, session).err().unwrap_or(0),
        });
        true
    });
    replay.requests = requests;
    replay.error = result.err().and_then(ended);
    replay
}
