//! The NBD server byte for byte, with a small client written from the
//! protocol document (not from the server's code): negotiation options,
//! errors, pipelined requests, protocol violations and shutdown. QEMU's
//! client only ever takes one path through these; `tests/qemu.rs` covers
//! that path end to end.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_lazydisk::{
    ChunkState, LazyDisk, LazyDiskOptions, LocalSection, NbdError, NbdOptions, NbdServer,
};
use ferry_package::{Package, SectionKind};

// Numbers from the protocol document.
const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const REPLY_MAGIC: u64 = 0x3e889045565a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_FUA: u16 = 1;
const FLAG_REQ_ONE: u16 = 8;
const STRUCTURED_MAGIC: u32 = 0x668e33ef;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = 0x8001;
const STATE_HOLE_ZERO: u32 = 3;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
/// HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_CACHE.
const FLAGS: u16 = 1 | 4 | 8 | 32 | 64 | 1024;

struct Setup {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    disk: Arc<LazyDisk>,
    server: Option<NbdServer>,
}

impl Setup {
    fn new(options: NbdOptions) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let image = image();
        let package = make_package(dir.path(), "vm.ferry", &image);
        let source = LocalSection::new(
            Arc::new(Package::open(&package).unwrap()),
            SectionKind::Disk,
        )
        .unwrap();
        let disk = Arc::new(
            LazyDisk::open(
                &dir.path().join("disk.raw"),
                source,
                LazyDiskOptions {
                    prefetch: false,
                    ..LazyDiskOptions::default()
                },
            )
            .unwrap(),
        );
        let server =
            NbdServer::serve_with(&dir.path().join("nbd.sock"), disk.clone(), options).unwrap();
        Setup {
            dir,
            image,
            disk,
            server: Some(server),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }
}

struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects and reads the server's greeting; sends `client_flags`.
    fn connect(path: &Path, client_flags: u32) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s };
        let hello = c.read(18);
        assert_eq!(&hello[..8], NBDMAGIC);
        assert_eq!(&hello[8..16], IHAVEOPT);
        // FIXED_NEWSTYLE | NO_ZEROES
        assert_eq!(u16::from_be_bytes([hello[16], hello[17]]), 3);
        c.write(&client_flags.to_be_bytes());
        c
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Whether the server closed the connection (EOF within the timeout,
    /// or a reset: a Unix socket closed with our bytes unread resets).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.write(&m);
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (option, kind, self.read(len as usize))
    }

    /// Sends INFO or GO for `name` asking for `infos`; returns the INFO
    /// replies' data and the final reply type.
    fn info(&mut self, option: u32, name: &str, infos: &[u16]) -> (Vec<Vec<u8>>, u32) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.option(option, &d);
        let mut got = Vec::new();
        loop {
            let (opt, kind, data) = self.reply();
            assert_eq!(opt, option);
            if kind == REP_INFO {
                got.push(data);
            } else {
                return (got, kind);
            }
        }
    }

    /// Negotiates with GO and returns (size, transmission flags).
    fn go(path: &Path) -> (Client, u64, u16) {
        let mut c = Client::connect(path, 3);
        let (infos, end) = c.info(OPT_GO, "", &[INFO_BLOCK_SIZE]);
        assert_eq!(end, REP_ACK);
        let export = infos
            .iter()
            .find(|d| u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        assert_eq!(export.len(), 12);
        let size = u64::from_be_bytes(export[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes([export[10], export[11]]);
        (c, size, flags)
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut r = 0x25609513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.write(&r);
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read(16);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x67446698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// A request answered without data: its error.
    fn call(&mut self, flags: u16, kind: u16, offset: u64, len: u32) -> u32 {
        self.request(flags, kind, 7, offset, len);
        let (err, cookie) = self.simple();
        assert_eq!(cookie, 7);
        err
    }

    fn read_at(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 9, offset, len);
        match self.simple() {
            (0, 9) => Ok(self.read(len as usize)),
            (err, 9) => Err(err),
            other => panic!("{other:?}"),
        }
    }

    /// One structured reply chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_MAGIC
        );
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (flags, kind, cookie, self.read(len as usize))
    }

    /// Sends LIST or SET_META_CONTEXT; returns the contexts' (id, name)
    /// and the final reply type.
    fn meta(&mut self, option: u32, name: &str, queries: &[&str]) -> (Vec<(u32, String)>, u32) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.option(option, &d);
        let mut got = Vec::new();
        loop {
            let (opt, kind, data) = self.reply();
            assert_eq!(opt, option);
            if kind != REP_META_CONTEXT {
                return (got, kind);
            }
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            got.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
        }
    }

    /// BLOCK_STATUS in one structured chunk: (context id, [(len, flags)]),
    /// or the error of an error chunk.
    fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<(u32, Vec<(u32, u32)>), u32> {
        self.request(flags, CMD_BLOCK_STATUS, 13, offset, len);
        let (rflags, kind, cookie, data) = self.chunk();
        assert_eq!((rflags, cookie), (REPLY_FLAG_DONE, 13));
        let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
        match kind {
            REPLY_TYPE_BLOCK_STATUS => {
                assert_eq!(data.len() % 8, 4);
                let extents = (4..data.len())
                    .step_by(8)
                    .map(|at| (be32(at), be32(at + 4)))
                    .collect();
                Ok((be32(0), extents))
            }
            REPLY_TYPE_ERROR => Err(be32(0)),
            other => panic!("reply type {other}"),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(0, CMD_WRITE, 11, offset, data.len() as u32);
        self.write(data);
        let (err, cookie) = self.simple();
        assert_eq!(cookie, 11);
        err
    }
}

#[test]
fn negotiation_options() {
    let t = Setup::new(NbdOptions::default());
    let mut c = Client::connect(&t.socket(), 3);

    c.option(OPT_LIST, &[]);
    let (_, kind, data) = c.reply();
    assert_eq!(kind, REP_SERVER);
    assert_eq!(data, [&5u32.to_be_bytes()[..], b"ferry"].concat());
    assert_eq!(c.reply().1, REP_ACK);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);

    // No TLS, nor options this server does not know.
    for opt in [OPT_STARTTLS, 4242] {
        c.option(opt, &[]);
        let (o, kind, _) = c.reply();
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
    }

    // INFO: the export's size and flags, block sizes when asked.
    let (infos, end) = c.info(OPT_INFO, "ferry", &[INFO_BLOCK_SIZE]);
    assert_eq!(end, REP_ACK);
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&SIZE.to_be_bytes());
    export.extend_from_slice(&FLAGS.to_be_bytes());
    assert!(infos.contains(&export), "{infos:?}");
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for n in [1u32, 4096, 32 << 20] {
        sizes.extend_from_slice(&n.to_be_bytes());
    }
    assert!(infos.contains(&sizes), "{infos:?}");
    let (infos, end) = c.info(OPT_INFO, "", &[]);
    assert_eq!((infos.len(), end), (1, REP_ACK));
    let (infos, end) = c.info(OPT_GO, "other", &[]);
    assert_eq!((infos.len(), end), (0, REP_ERR_UNKNOWN));
    // A malformed request.
    c.option(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.reply().1, REP_ERR_INVALID);

    // GO enters transmission.
    let (infos, end) = c.info(OPT_GO, "ferry", &[]);
    assert_eq!((infos.len(), end), (1, REP_ACK));
    assert_eq!(c.read_at(0, 4096).unwrap(), t.image[..4096]);
    c.request(0, CMD_DISC, 1, 0, 0);
    assert!(c.closed());
}

#[test]
fn export_name_with_and_without_zeroes() {
    let t = Setup::new(NbdOptions::default());
    for (client_flags, padding) in [(1u32, 124usize), (3, 0)] {
        let mut c = Client::connect(&t.socket(), client_flags);
        c.option(OPT_EXPORT_NAME, b"");
        let r = c.read(10 + padding);
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
        assert_eq!(u16::from_be_bytes([r[8], r[9]]), FLAGS);
        assert!(r[10..].iter().all(|&b| b == 0));
        // The next bytes are a reply to a request, not more padding.
        assert_eq!(
            c.read_at(SIZE - 4096, 4096).unwrap(),
            t.image[t.image.len() - 4096..]
        );
    }
    // An unknown name ends the session (this option has no error reply).
    let mut c = Client::connect(&t.socket(), 3);
    c.option(OPT_EXPORT_NAME, b"other");
    assert!(c.closed());
}

#[test]
fn abort_and_unknown_client_flags_end_the_session() {
    let t = Setup::new(NbdOptions::default());
    let mut c = Client::connect(&t.socket(), 3);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply(), (OPT_ABORT, REP_ACK, Vec::new()));
    assert!(c.closed());
    let mut c = Client::connect(&t.socket(), 3 | 8);
    assert!(c.closed());
}

#[test]
fn requests_and_their_errors() {
    let t = Setup::new(NbdOptions::default());
    let (mut c, size, flags) = Client::go(&t.socket());
    assert_eq!((size, flags), (SIZE, FLAGS));

    // Out of range: reads and trims are invalid, writes are out of space;
    // the connection carries on after each.
    assert_eq!(c.read_at(SIZE - 4096, 8192), Err(EINVAL));
    assert_eq!(c.read_at(u64::MAX - 10, 4096), Err(EINVAL));
    assert_eq!(c.write_at(SIZE, &[1; 512]), ENOSPC);
    assert_eq!(c.call(0, CMD_TRIM, SIZE, 4096), EINVAL);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, SIZE - 1, 2), ENOSPC);
    // Larger than the maximum payload (there is no payload to skip).
    assert_eq!(c.read_at(0, (32 << 20) + 1), Err(EINVAL));
    // Unknown commands and flags.
    assert_eq!(c.call(0, 99, 0, 0), EINVAL);
    assert_eq!(c.call(1 << 2, CMD_READ, 0, 512), EINVAL);
    assert_eq!(
        c.call(2, CMD_WRITE_ZEROES, 0, 0),
        0,
        "NO_HOLE is valid here"
    );
    assert_eq!(t.disk.status().chunks_fetched, 0);

    // Writes with FUA, flush, write-zeroes both ways, cache.
    let data: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
    c.request(FLAG_FUA, CMD_WRITE, 5, 100, data.len() as u32);
    c.write(&data);
    assert_eq!(c.simple(), (0, 5));
    assert_eq!(c.read_at(100, 8192).unwrap(), data);
    assert_eq!(c.read_at(0, 100).unwrap(), t.image[..100]);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 4096, 4096), 0);
    assert_eq!(c.call(2, CMD_WRITE_ZEROES, 3 << 20, 1 << 20), 0);
    assert!(c.read_at(4096, 4096).unwrap().iter().all(|&b| b == 0));
    assert!(c.read_at(3 << 20, 1 << 20).unwrap().iter().all(|&b| b == 0));
    assert_eq!(
        c.read_at(2 << 20, 4096).unwrap(),
        t.image[2 << 20..(2 << 20) + 4096]
    );
    assert_eq!(t.disk.chunk_state(7), Some(ChunkState::Absent));
    assert_eq!(c.call(0, CMD_CACHE, 14 << 20, 4096), 0);
    assert_eq!(t.disk.chunk_state(7), Some(ChunkState::Present));
    // A trim of a whole absent chunk makes it present without a fetch.
    let fetched = t.disk.status().chunks_fetched;
    assert_eq!(c.call(FLAG_FUA, CMD_TRIM, 8 << 20, 2 << 20), 0);
    assert_eq!(t.disk.chunk_state(4), Some(ChunkState::Present));
    assert_eq!(t.disk.status().chunks_fetched, fetched);
    c.request(0, CMD_DISC, 1, 0, 0);
    assert!(c.closed());
}

#[test]
fn pipelined_requests_are_all_answered() {
    let t = Setup::new(NbdOptions::default());
    let (mut c, _, _) = Client::go(&t.socket());
    // 24 reads over six chunks and a write, sent before reading any reply.
    let reads: Vec<(u64, u64)> = (0..24u64)
        .map(|k| (100 + k, (k % 6) * (2 << 20) + k * 70_000))
        .collect();
    for &(cookie, offset) in &reads {
        c.request(0, CMD_READ, cookie, offset, 65536);
    }
    c.request(0, CMD_WRITE, 1, 10 << 20, 512);
    c.write(&[0x5a; 512]);
    let mut seen = Vec::new();
    for _ in 0..=reads.len() {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0, "cookie {cookie}");
        if cookie == 1 {
            seen.push(cookie);
            continue;
        }
        let (_, offset) = reads.iter().find(|r| r.0 == cookie).expect("a cookie sent");
        let data = c.read(65536);
        let at = *offset as usize;
        assert!(data == t.image[at..at + 65536], "cookie {cookie}");
        seen.push(cookie);
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), reads.len() + 1);
    // Chunks 0 to 5 but the zero chunk 3.
    assert_eq!(t.disk.status().chunks_fetched, 5);
}

#[test]
fn protocol_violations_hang_up() {
    let t = Setup::new(NbdOptions::default());
    // A request with a wrong magic.
    let (mut c, _, _) = Client::go(&t.socket());
    c.write(&[0u8; 28]);
    assert!(c.closed());
    // A write larger than the maximum payload.
    let (mut c, _, _) = Client::go(&t.socket());
    c.request(0, CMD_WRITE, 1, 0, (32 << 20) + 1);
    assert!(c.closed());
    // An option with a wrong magic, and an option of 1 MiB.
    let mut c = Client::connect(&t.socket(), 3);
    c.write(&[0u8; 16]);
    assert!(c.closed());
    let mut c = Client::connect(&t.socket(), 3);
    let mut m = IHAVEOPT.to_vec();
    m.extend_from_slice(&OPT_LIST.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    c.write(&m);
    assert!(c.closed());
    // The server is still there for the next client.
    let (mut c, _, _) = Client::go(&t.socket());
    assert_eq!(c.read_at(0, 512).unwrap(), t.image[..512]);
}

#[test]
fn read_only_exports_refuse_writes() {
    let t = Setup::new(NbdOptions {
        read_only: true,
        ..NbdOptions::default()
    });
    let (mut c, _, flags) = Client::go(&t.socket());
    assert_eq!(flags, FLAGS | 2);
    assert_eq!(c.write_at(0, &[1; 512]), EPERM);
    assert_eq!(c.call(0, CMD_TRIM, 0, 4096), EPERM);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 4096), EPERM);
    assert_eq!(c.read_at(0, 512).unwrap(), t.image[..512]);
}

#[test]
fn stopping_closes_connections_and_removes_the_socket() {
    let mut t = Setup::new(NbdOptions::default());
    let socket = t.socket();
    let (mut c, _, _) = Client::go(&socket);
    assert_eq!(c.read_at(0, 512).unwrap(), t.image[..512]);
    let mut idle = Client::connect(&socket, 3);
    let server = t.server.take().unwrap();
    assert_eq!(server.live_connections(), 2);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.stop();
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server stops while clients are connected");
    assert!(c.closed());
    assert!(idle.closed());
    assert!(!socket.exists());

    // A socket left by a server that died is replaced; a live one is not.
    let stale = t.dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let s1 = NbdServer::serve(&stale, t.disk.clone()).unwrap();
    let e = NbdServer::serve(&stale, t.disk.clone()).unwrap_err();
    assert!(matches!(e, NbdError::InUse { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("another NBD server is listening there"),
        "{e}"
    );
    let (mut c, _, _) = Client::go(&stale);
    assert_eq!(c.read_at(0, 512).unwrap(), t.image[..512]);
    drop(s1);
    assert!(c.closed());
}

#[test]
fn structured_replies_and_block_status() {
    let t = Setup::new(NbdOptions::default());
    let mut c = Client::connect(&t.socket(), 3);
    // Metadata contexts need structured replies first; listing is allowed.
    let (got, end) = c.meta(OPT_SET_META_CONTEXT, "", &["base:allocation"]);
    assert_eq!((got.len(), end), (0, REP_ERR_INVALID));
    c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply(), (OPT_STRUCTURED_REPLY, REP_ACK, Vec::new()));

    // Listing: every context with no query or the `base:` wildcard;
    // unknown namespaces are ignored.
    for queries in [&[][..], &["base:"], &["x-other:thing", "base:allocation"]] {
        let (got, end) = c.meta(OPT_LIST_META_CONTEXT, "", queries);
        assert_eq!(end, REP_ACK);
        let names: Vec<_> = got.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["base:allocation"], "{queries:?}");
    }
    let (got, end) = c.meta(OPT_LIST_META_CONTEXT, "", &["qemu:dirty-bitmap:x"]);
    assert_eq!((got.len(), end), (0, REP_ACK));
    let (_, end) = c.meta(OPT_LIST_META_CONTEXT, "other", &[]);
    assert_eq!(end, REP_ERR_UNKNOWN);
    c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9]);
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    // `base:` selects nothing; `base:allocation` selects the context.
    let (got, end) = c.meta(OPT_SET_META_CONTEXT, "ferry", &["base:"]);
    assert_eq!((got.len(), end), (0, REP_ACK));
    let (got, end) = c.meta(OPT_SET_META_CONTEXT, "", &["x-a:b", "base:allocation"]);
    assert_eq!(end, REP_ACK);
    assert_eq!(got.len(), 1);
    let (id, name) = got[0].clone();
    assert_eq!(name, "base:allocation");
    let (_, end) = c.info(OPT_GO, "", &[]);
    assert_eq!(end, REP_ACK);

    // The whole disk, nothing fetched yet: the zero chunk is a hole that
    // reads as zeros, every other chunk "data" (and not fetched to say so).
    let (got_id, extents) = c.block_status(0, 0, SIZE as u32).unwrap();
    assert_eq!(got_id, id);
    let z = ZERO_CHUNK as u32;
    let chunk = CHUNK as u32;
    assert_eq!(
        extents,
        vec![
            (z * chunk, 0),
            (chunk, STATE_HOLE_ZERO),
            (SIZE as u32 - (z + 1) * chunk, 0)
        ]
    );
    assert_eq!(t.disk.status().chunks_fetched, 0);
    // REQ_ONE: one extent, within the request.
    let (_, extents) = c
        .block_status(FLAG_REQ_ONE, z as u64 * CHUNK + 4096, 2 * chunk)
        .unwrap();
    assert_eq!(extents, vec![(chunk - 4096, STATE_HOLE_ZERO)]);
    let (_, extents) = c.block_status(FLAG_REQ_ONE, 0, 2 * chunk).unwrap();
    assert_eq!(extents, vec![(2 * chunk, 0)]);

    // A read is one OFFSET_DATA chunk, flagged done.
    let offset = 6 * CHUNK;
    c.request(0, CMD_READ, 21, offset, chunk);
    let (flags, kind, cookie, data) = c.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 21)
    );
    assert_eq!(u64::from_be_bytes(data[..8].try_into().unwrap()), offset);
    assert!(data[8..] == t.image[offset as usize..(offset + CHUNK) as usize]);
    // Chunk 6 is here now, its zero blocks (200..204) left as holes.
    let (_, extents) = c.block_status(0, offset, chunk).unwrap();
    let zeros_at = (200 * BLOCK) as u32 - offset as u32;
    assert_eq!(
        extents,
        vec![
            (zeros_at, 0),
            (4 * BLOCK as u32, STATE_HOLE_ZERO),
            (chunk - zeros_at - 4 * BLOCK as u32, 0)
        ]
    );
    // A trimmed chunk and written zeros read as zeros, unfetched. Other
    // requests are answered with a NONE chunk, flagged done.
    for (kind, at) in [(CMD_TRIM, CHUNK), (CMD_WRITE_ZEROES, 2 * CHUNK)] {
        c.request(0, kind, 22, at, chunk);
        assert_eq!(c.chunk(), (REPLY_FLAG_DONE, 0, 22, Vec::new()));
    }
    let (_, extents) = c.block_status(0, 0, 4 * chunk).unwrap();
    assert_eq!(extents, vec![(chunk, 0), (3 * chunk, STATE_HOLE_ZERO)]);
    assert_eq!(t.disk.status().chunks_fetched, 1);

    // Errors are error chunks.
    assert_eq!(c.block_status(0, SIZE - 512, 1024), Err(EINVAL));
    assert_eq!(c.block_status(0, 0, 0), Err(EINVAL));
    c.request(0, CMD_READ, 23, SIZE, 1);
    let (flags, kind, cookie, data) = c.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 23)
    );
    assert_eq!(data, [&EINVAL.to_be_bytes()[..], &[0, 0]].concat());

    // Without a selected context, BLOCK_STATUS is refused.
    let mut plain = Client::connect(&t.socket(), 3);
    plain.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(plain.reply().1, REP_ACK);
    assert_eq!(plain.info(OPT_GO, "", &[]).1, REP_ACK);
    assert_eq!(plain.block_status(0, 0, 4096), Err(EINVAL));
    // And without structured replies, too (as a simple reply).
    let (mut simple, _, _) = Client::go(&t.socket());
    assert_eq!(simple.call(0, CMD_BLOCK_STATUS, 0, 4096), EINVAL);
}
