//! What ferry's fuzz targets run: each parser of bytes that come from
//! someone ferry does not trust (a registry, a guest, a migration peer, an
//! NBD client, an HTTP client), fed one input, with the invariants its
//! result must keep.
//!
//! The fuzzer (`fuzz/`, libFuzzer, see `docs/security.md`) calls these
//! functions, one target each; the corpus tests (`tests/corpus.rs`) run
//! every file of `fuzz/corpus/<target>/` through the same function in an
//! ordinary `cargo test`, so a crash once found stays fixed. A function
//! panics when an invariant breaks (a parser that panics on its own is the
//! bug the fuzzer looks for) and returns whether the parser accepted the
//! input: seeds (`ok-*` in the corpus) must be accepted.
#![warn(missing_docs)]

use std::path::Path;

use ferry_agent_proto::shell::{ClientHello, FrameDecoder, Kind, OpenRequest, Opened, PortHello};
use ferry_agent_proto::{Decoder, Frame, Reply, Request};
use ferry_lazydisk::{NbdOptions, MAX_PAYLOAD};
use ferry_package::{PackageIndex, SectionKind, VmMeta, HEADER_SIZE};
use ferry_transport::migration::{self, DestMsg, SourceMsg};
use ferry_transport::range::{self, RangeRequest};
use sha2::{Digest, Sha256};

/// A fuzz target: takes one input, panics on a bug, says whether the input
/// was accepted.
pub type Target = fn(&[u8]) -> bool;

/// Every target, by the name its corpus directory and fuzz binary have.
pub const TARGETS: &[(&str, Target)] = &[
    ("package_file", package_file),
    ("package_table", package_table),
    ("agent", agent),
    ("migration", migration),
    ("nbd", nbd),
    ("http_range", http_range),
];

/// The target named `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

const SOURCE: &str = "fuzz.ferry";

/// A whole package file, as [`Package::open`](ferry_package::Package::open)
/// and a registry client read it: the header, then the section table where
/// the header says, then every stored chunk checked against its sha256.
///
/// The input is tried as it is, and once more with its two checksums
/// (the header's own and the table's) made right, so that mutations get
/// past them to the table and the chunks. Accepted: the input as it is
/// opened.
pub fn package_file(data: &[u8]) -> bool {
    let accepted = open_package(data);
    if let Some(fixed) = with_checksums_fixed(data) {
        open_package(&fixed);
    }
    accepted
}

fn open_package(data: &[u8]) -> bool {
    let source = Path::new(SOURCE);
    let len = data.len() as u64;
    let head = &data[..data.len().min(HEADER_SIZE as usize)];
    let Ok(range) = PackageIndex::table_range(source, head, len) else {
        return false;
    };
    assert!(range.start >= HEADER_SIZE && range.start < range.end && range.end == len);
    let table = &data[range.start as usize..range.end as usize];
    let Ok(index) = PackageIndex::from_parts(source, head, table, len) else {
        return false;
    };
    check_index(&index, range.start);
    for s in index.sections() {
        for (i, c) in s.chunks.iter().enumerate() {
            let Some(c) = c else { continue };
            // Checked by from_parts: stored chunks lie in the data area.
            let stored = &data[c.offset as usize..(c.offset + c.stored_len) as usize];
            if let Ok(bytes) = s.decode_chunk(i, stored) {
                assert_eq!(Some(bytes.len() as u64), s.chunk_len(i));
            }
        }
    }
    true
}

/// `data` with the table checksum (over the bytes the header points at)
/// and the header checksum recomputed; `None` when it has no whole header
/// or its table lies outside it.
fn with_checksums_fixed(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HEADER_SIZE as usize {
        return None;
    }
    let mut d = data.to_vec();
    let offset = u64::from_le_bytes(d[16..24].try_into().ok()?);
    let len = u64::from_le_bytes(d[24..32].try_into().ok()?);
    let end = offset.checked_add(len)?;
    if end > d.len() as u64 {
        return None;
    }
    let table_sha = Sha256::digest(&d[offset as usize..end as usize]);
    d[32..64].copy_from_slice(&table_sha);
    let header_sha = Sha256::digest(&d[..64]);
    d[64..96].copy_from_slice(&header_sha);
    Some(d)
}

/// The data area a [`package_table`] input is checked against: chunks
/// must lie in `HEADER_SIZE..HEADER_SIZE + TABLE_DATA_AREA`.
pub const TABLE_DATA_AREA: u64 = 1 << 30;

/// A section table (the JSON at the end of a package), behind a header
/// made for it: every check of `docs/package-format.md` on the table
/// itself, without the chunks (see [`package_file`] for those).
pub fn package_table(table: &[u8]) -> bool {
    let source = Path::new(SOURCE);
    let offset = HEADER_SIZE + TABLE_DATA_AREA;
    let len = offset + table.len() as u64;
    let head = header_for(offset, table);
    let Ok(index) = PackageIndex::from_parts(source, &head, table, len) else {
        return false;
    };
    check_index(&index, offset);
    true
}

/// A format 1.0 header whose table, `table`, lies at `offset`.
pub fn header_for(offset: u64, table: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[..8].copy_from_slice(ferry_package::MAGIC);
    h[8..10].copy_from_slice(&ferry_package::FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&ferry_package::FORMAT_MINOR.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..32].copy_from_slice(&(table.len() as u64).to_le_bytes());
    h[32..64].copy_from_slice(&Sha256::digest(table));
    let sum = Sha256::digest(&h[..64]);
    h[64..96].copy_from_slice(&sum);
    h
}

/// What a checked index must hold, and what callers do with one.
fn check_index(index: &PackageIndex, data_end: u64) {
    let _ = VmMeta::from_json(index.metadata(), SOURCE).map_err(|e| e.to_string());
    for kind in SectionKind::ALL {
        let _ = index.section(kind).map_err(|e| e.to_string());
    }
    for s in index.sections() {
        assert_eq!(s.stored_chunks() + s.zero_chunks(), s.chunk_count());
        let mut total = 0u64;
        for (i, c) in s.chunks.iter().enumerate() {
            let len = s.chunk_len(i).expect("every listed chunk has a length");
            assert!(len > 0 && len <= s.chunk_size);
            total += len;
            if let Some(c) = c {
                assert!(c.offset >= HEADER_SIZE && c.offset + c.stored_len <= data_end);
            }
        }
        assert_eq!(total, s.size);
        assert_eq!(s.chunk_len(s.chunk_count()), None);
        assert!(s.stored_bytes() <= data_end);
    }
}

/// The host's side of the agent channel: the byte stream a guest's agent
/// sends, split into lines (fed in two pieces, which must not change the
/// lines), each decoded as a [`Reply`] (and as a [`Request`], the agent's
/// side); exec output capped (at a limit taken from the frame id, so that
/// small inputs reach the cut) and base64-decoded as the host does. The
/// same bytes also go through the shell channel's frame decoder.
///
/// Accepted: at least one line, and every line a frame of either side; or
/// at least one shell frame.
pub fn agent(data: &[u8]) -> bool {
    let split = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let whole = Decoder::new().push(data);
    let mut pieces = Decoder::new();
    let mut lines = pieces.push(&data[..split]);
    lines.extend(pieces.push(&data[split..]));
    assert_eq!(whole, lines, "lines depend on how the stream was cut");

    let mut accepted = !lines.is_empty();
    for line in &lines {
        let reply = ferry_agent_proto::decode::<Reply>(line);
        let request = ferry_agent_proto::decode::<Request>(line);
        if let Err(e) = &reply {
            let _ = e.to_string();
        }
        accepted &= reply.is_ok() || request.is_ok();
        if let Ok(Frame {
            id,
            body:
                Reply::ExecResult {
                    stdout_b64,
                    stderr_b64,
                    ..
                },
            ..
        }) = reply
        {
            for text in [stdout_b64, stderr_b64] {
                // Every cut of a short field (the real cap is 4 MiB, out
                // of a fuzzer's reach), and one taken from the id.
                let short = (text.len() < 256).then_some(0..text.len() + 4);
                for max in short.into_iter().flatten().chain([(id % 4096) as usize]) {
                    check_cap(&text, max);
                }
            }
        }
    }

    let mut frames = FrameDecoder::new();
    let mut shell = frames.push(&data[..split]);
    shell.extend(frames.push(&data[split..]));
    for f in &shell {
        let _ = f.size();
        let _ = f.code();
        match f.kind {
            Kind::Hello => {
                let _ = f.parse::<PortHello>();
                let _ = f.parse::<ClientHello>();
            }
            Kind::Open => {
                let _ = f.parse::<OpenRequest>();
            }
            Kind::Opened => {
                let _ = f.parse::<Opened>();
            }
            _ => {}
        }
    }
    accepted || !shell.is_empty()
}

/// Caps `text` at `max` decoded bytes as the host caps exec output.
fn check_cap(text: &str, max: usize) {
    let mut capped = text.to_string();
    let cut = ferry_agent_proto::cap_b64(&mut capped, max);
    if cut {
        assert!(capped.len() <= max.div_ceil(3) * 4 && text.starts_with(&capped));
    } else {
        assert_eq!(capped, text);
    }
    if let Ok(bytes) = ferry_agent_proto::b64_decode(&capped) {
        assert!(!cut || bytes.len() <= max);
    }
}

/// What a migration peer reads off the network: a hello line (the
/// listener, before the token check), and a control line as the first
/// message of a source (an offer, validated), any [`SourceMsg`], or a
/// [`DestMsg`]. Every error is formatted, as it would be logged.
///
/// Accepted: a hello, a validated first message, or a destination message.
pub fn migration(line: &[u8]) -> bool {
    let hello = migration::decode_hello(line, "fuzz-peer");
    if let Ok(h) = &hello {
        let _ = format!("{h:?}");
    }
    let first = migration::decode_line::<serde_json::Value>(line)
        .and_then(|v| migration::first_source_msg(v, "fuzz-peer"));
    let any = migration::decode_line::<SourceMsg>(line);
    let dest = migration::decode_line::<DestMsg>(line);
    for e in [
        hello.as_ref().err(),
        first.as_ref().err(),
        any.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    .chain(dest.as_ref().err())
    {
        let _ = e.to_string();
    }
    if let Ok(SourceMsg::Offer { vm, .. }) = &any {
        let _ = vm.validate().map_err(|e| e.to_string());
    }
    hello.is_ok() || first.is_ok() || dest.is_ok()
}

/// The export size the NBD target serves: 64 MiB.
pub const NBD_EXPORT_SIZE: u64 = 64 << 20;

/// Everything an NBD client sends to ferry's lazy-disk server: the
/// handshake, then requests, each checked as the server checks it before
/// it touches the disk; once for a writable export, once read-only.
///
/// Accepted: the client entered transmission and broke no rule on the way.
pub fn nbd(data: &[u8]) -> bool {
    let mut accepted = false;
    for read_only in [false, true] {
        let options = NbdOptions {
            read_only,
            ..NbdOptions::default()
        };
        let replay = ferry_lazydisk::replay_client(data, NBD_EXPORT_SIZE, &options);
        for r in &replay.requests {
            const READ: u16 = 0;
            const WRITE: u16 = 1;
            const FLUSH: u16 = 3;
            if r.command == WRITE {
                assert_eq!(r.payload, r.len as usize);
                assert!(r.len <= MAX_PAYLOAD);
            } else {
                assert_eq!(r.payload, 0);
            }
            if r.verdict == 0 && r.command != FLUSH {
                assert!(r.offset + u64::from(r.len) <= NBD_EXPORT_SIZE);
            }
            if r.verdict == 0 && r.command == READ {
                assert!(r.len <= MAX_PAYLOAD);
            }
            if read_only && r.verdict == 0 {
                assert!(!matches!(r.command, 1 | 4 | 6), "a write ran read-only");
            }
        }
        if !read_only {
            accepted = replay.transmission && replay.error.is_none();
        }
    }
    accepted
}

/// An HTTP range header value: as a registry's `Range` (for files of a
/// few lengths), and as a client's `Content-Range` (a 206's or a 416's).
///
/// Accepted: any of them reads as a range.
pub fn http_range(data: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(data) else {
        return false;
    };
    let mut accepted = false;
    for len in [0, 1, 4096, 1 << 40, u64::MAX] {
        match range::parse(Some(value), len) {
            RangeRequest::Partial { first, last } => {
                assert!(
                    first <= last && last < len,
                    "{value:?} of {len}: {first}-{last}"
                );
                // What the server sends as Content-Length.
                let _ = last - first + 1;
                accepted = true;
            }
            RangeRequest::Unsatisfiable => accepted = true,
            RangeRequest::Full => {}
        }
    }
    if let Some((first, last, total)) = range::parse_content_range(value) {
        assert!(first <= last && last < total);
        accepted = true;
    }
    accepted |= range::parse_unsatisfied(value).is_some();
    accepted
}
