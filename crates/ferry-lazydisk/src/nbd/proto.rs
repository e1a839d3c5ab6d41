//! NBD wire constants and message layouts, as in the protocol document
//! (`doc/proto.md` of the NetworkBlockDevice project). Only what this
//! server speaks: fixed newstyle negotiation, simple and structured
//! replies, and the `base:allocation` metadata context. All integers are
//! big-endian.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply flags and types.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context this server has.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
// `base:allocation` status flags.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;

// Errors in replies.
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;

/// Length of a request header.
pub(crate) const REQUEST_LEN: usize = 28;

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Parses a request header; `None` for a wrong magic.
    pub(crate) fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let be16 = |o: usize| u16::from_be_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        (be32(0) == REQUEST_MAGIC).then(|| Request {
            flags: be16(4),
            kind: be16(6),
            cookie: be64(8),
            offset: be64(16),
            len: be32(24),
        })
    }
}

/// A simple reply header (the data of a successful read follows it).
pub(crate) fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..].copy_from_slice(&cookie.to_be_bytes());
    r
}

/// A structured reply chunk header; `len` bytes of payload follow it.
pub(crate) fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&flags.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..].copy_from_slice(&len.to_be_bytes());
    r
}

/// An option reply.
pub(crate) fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: the export name and the
/// information types asked for; `None` if malformed.
pub(crate) fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
/// the export name and the queries; `None` if malformed (a length that
/// reaches past the option, or bytes left over).
pub(crate) fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let be32 = |b: &[u8], at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let name_len = be32(data, 0)?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let mut at = 4 + name_len;
    let count = be32(data, at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = be32(data, at)?;
        at += 4;
        queries.push(data.get(at..at.checked_add(len)?)?);
        at += len;
    }
    (at == data.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_what_they_should() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn requests_parse() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beef_u64.to_be_bytes());
        b[16..24].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[24..].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(
            Request::parse(&b),
            Some(Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0xdead_beef,
                offset: 1 << 20,
                len: 4096
            })
        );
        b[0] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn meta_requests_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:"[..], b"qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        let (name, queries) = parse_meta_request(&d).unwrap();
        assert_eq!(name, b"");
        assert_eq!(queries, vec![&b"base:"[..], b"qemu:dirty-bitmap:x"]);
        assert!(parse_meta_request(&d[..d.len() - 1]).is_none());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_meta_request(&extra).is_none());
        let mut huge = d.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge).is_none());
    }

    #[test]
    fn info_requests_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let (name, infos) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"disk");
        assert_eq!(infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        assert!(parse_info_request(&d[..3]).is_none());
        let mut long = d.clone();
        long[3] = 200;
        assert!(parse_info_request(&long).is_none());
    }
}
