//! The shell protocol: `ferry shell` sessions over a second virtio-serial
//! port, [`SHELL_PORT_NAME`], served in the guest by `ferry-agent
//! --shell-server`, a process of its own (a hung agent does not stop it).
//!
//! Shell traffic is bytes typed at a terminal, so frames are binary, not
//! JSON lines: a fixed header and a payload. Each frame names its session,
//! so one port carries any number of sessions at once; the host side (the
//! VM's owner) hands every client its own session id. See `docs/shell.md`.
//!
//! ```text
//! offset size
//! 0      2    magic "FS" (a reader that lost its place skips to the next one)
//! 2      1    kind ([`Kind`])
//! 3      4    session id, big-endian (0 for frames about the whole port)
//! 7      4    payload length, big-endian, at most [`MAX_PAYLOAD`]
//! 11     n    payload
//! ```
//!
//! The same frames travel between `ferry shell` and the owner, on
//! `<vm dir>/shell.sock`, after a one-line JSON handshake
//! ([`ClientHello`], [`ClientWelcome`]).

use serde::{Deserialize, Serialize};

/// Version of the shell protocol, carried in [`Kind::Hello`] and in the
/// client handshake. A peer refuses any other major version.
pub const SHELL_PROTOCOL_VERSION: u32 = 1;

/// Name of the virtio-serial port the shell server listens on.
pub const SHELL_PORT_NAME: &str = "ferry.shell";

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 11;

const MAGIC: [u8; 2] = *b"FS";

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host → guest on a new connection: every session of an earlier
    /// connection is hung up. Payload: [`PortHello`] (JSON). The guest
    /// answers with its own `Hello`.
    Hello = 1,
    /// Host → guest: start a session. Payload: [`OpenRequest`] (JSON).
    Open = 2,
    /// Guest → host: the session runs. Payload: [`Opened`] (JSON).
    Opened = 3,
    /// Guest → host: the session could not start. Payload: a UTF-8 message.
    OpenFailed = 4,
    /// Host → guest: input for the session.
    Stdin = 5,
    /// Guest → host: output (a terminal session has only this stream).
    Stdout = 6,
    /// Guest → host: error output of a session without a terminal.
    Stderr = 7,
    /// Host → guest: no more input (the session's stdin is closed).
    StdinEof = 8,
    /// Host → guest: the terminal's size changed. Payload: rows, cols (u16 BE each).
    Resize = 9,
    /// Guest → host: the session's command ended. Payload: exit code (i32 BE;
    /// 128 + signal if killed).
    Exit = 10,
    /// Host → guest: the client went away; hang the session up (SIGHUP to its
    /// process group, SIGKILL a second later).
    Close = 11,
    /// Either way: answer with `Pong` carrying the same payload.
    Ping = 12,
    /// The answer to `Ping`.
    Pong = 13,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Open,
            3 => Opened,
            4 => OpenFailed,
            5 => Stdin,
            6 => Stdout,
            7 => Stderr,
            8 => StdinEof,
            9 => Resize,
            10 => Exit,
            11 => Close,
            12 => Ping,
            13 => Pong,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellFrame {
    /// What it is.
    pub kind: Kind,
    /// Which session (0: the port itself).
    pub session: u32,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl ShellFrame {
    /// A frame with a payload.
    pub fn new(kind: Kind, session: u32, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            kind,
            session,
            payload: payload.into(),
        }
    }

    /// A frame whose payload is `body` as JSON.
    pub fn json<T: Serialize>(kind: Kind, session: u32, body: &T) -> Self {
        Self::new(
            kind,
            session,
            serde_json::to_vec(body).expect("shell JSON serialises"),
        )
    }

    /// A `Resize` frame.
    pub fn resize(session: u32, rows: u16, cols: u16) -> Self {
        let mut p = rows.to_be_bytes().to_vec();
        p.extend_from_slice(&cols.to_be_bytes());
        Self::new(Kind::Resize, session, p)
    }

    /// An `Exit` frame.
    pub fn exit(session: u32, code: i32) -> Self {
        Self::new(Kind::Exit, session, code.to_be_bytes().to_vec())
    }

    /// The payload parsed as JSON.
    ///
    /// # Errors
    /// The payload is not the expected JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.payload).map_err(|e| format!("bad {:?} frame: {e}", self.kind))
    }

    /// Rows and columns of a `Resize` frame.
    pub fn size(&self) -> Option<(u16, u16)> {
        let p = self.payload.get(..4)?;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    /// The code of an `Exit` frame.
    pub fn code(&self) -> Option<i32> {
        let p = self.payload.get(..4)?;
        Some(i32::from_be_bytes([p[0], p[1], p[2], p[3]]))
    }

    /// The frame's bytes. Payloads longer than [`MAX_PAYLOAD`] must be split
    /// by the caller ([`ShellFrame::data`] does for output).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.payload.len() <= MAX_PAYLOAD);
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// `data` as frames of `kind`, split at [`MAX_PAYLOAD`], encoded.
    pub fn data(kind: Kind, session: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + HEADER_LEN);
        for chunk in data.chunks(MAX_PAYLOAD) {
            out.extend_from_slice(&ShellFrame::new(kind, session, chunk.to_vec()).encode());
        }
        out
    }
}

/// Turns a byte stream into frames. Bytes that do not start a valid header
/// are skipped up to the next magic, so a reader that joins a stream in the
/// middle of a frame (a host reconnecting) finds its feet.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    skipped: u64,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets a partial frame (the peer disconnected).
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// Bytes skipped so far while looking for a frame.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Adds `bytes` and returns every frame now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<ShellFrame> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if rest.len() < HEADER_LEN {
                // Keep a possible start of a magic; drop anything before it.
                if !rest.is_empty() && rest[0] != MAGIC[0] {
                    self.skipped += 1;
                    at += 1;
                    continue;
                }
                break;
            }
            let kind = Kind::from_u8(rest[2]);
            let len = u32::from_be_bytes([rest[7], rest[8], rest[9], rest[10]]) as usize;
            if rest[..2] != MAGIC || kind.is_none() || len > MAX_PAYLOAD {
                self.skipped += 1;
                at += 1;
                continue;
            }
            if rest.len() < HEADER_LEN + len {
                break;
            }
            frames.push(ShellFrame {
                kind: kind.expect("checked"),
                session: u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]),
                payload: rest[HEADER_LEN..HEADER_LEN + len].to_vec(),
            });
            at += HEADER_LEN + len;
        }
        self.buf.drain(..at);
        frames
    }
}

/// Payload of [`Kind::Hello`], both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortHello {
    /// [`SHELL_PROTOCOL_VERSION`].
    pub v: u32,
    /// Who is speaking (`ferry 0.1.0`, `ferry-agent 0.1.0`), for logs.
    pub who: String,
}

/// Payload of [`Kind::Open`]: what to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The command; `None` for an interactive login shell (ferry's busybox
    /// `sh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Give the session a terminal (a PTY); without it stdin, stdout and
    /// stderr are pipes.
    pub tty: bool,
    /// The terminal's size (rows, cols), with `tty`.
    #[serde(default)]
    pub rows: u16,
    /// See `rows`.
    #[serde(default)]
    pub cols: u16,
    /// `TERM` for the session (the client's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

/// Payload of [`Kind::Opened`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// The session's process in the guest.
    pub pid: i32,
    /// Namespaces of the service that the session entered (`mnt`, `net`, ...).
    #[serde(default)]
    pub entered: Vec<String>,
}

/// The first line `ferry shell` writes on `<vm dir>/shell.sock` (JSON and a
/// newline); frames follow once the owner has answered [`ClientWelcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// [`SHELL_PROTOCOL_VERSION`].
    pub v: u32,
    /// What to open.
    pub open: OpenRequest,
}

/// The owner's one-line JSON answer to [`ClientHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum ClientWelcome {
    /// The session is open in the guest; frames follow (session id 1 on
    /// this connection, whatever the guest calls it).
    Opened(Opened),
    /// Refused or failed.
    Error {
        /// Why the request failed, as one line.
        message: String,
        /// What kind of failure: `no-shell-port` (a VM from a package made
        /// before ferry had the shell port), `not-allowed`, `guest` (the
        /// guest refused), `timeout`, `other`.
        kind: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let frames = vec![
            ShellFrame::json(
                Kind::Open,
                7,
                &OpenRequest {
                    argv: None,
                    tty: true,
                    rows: 24,
                    cols: 80,
                    term: Some("xterm".into()),
                },
            ),
            ShellFrame::resize(7, 50, 132),
            ShellFrame::exit(7, -1),
            ShellFrame::new(Kind::Stdin, 7, b"ls\r".to_vec()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(ShellFrame::encode).collect();
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in bytes.chunks(3) {
            got.extend(d.push(b));
        }
        assert_eq!(got, frames);
        assert_eq!(got[1].size(), Some((50, 132)));
        assert_eq!(got[2].code(), Some(-1));
        assert_eq!(d.skipped(), 0);
    }

    #[test]
    fn skips_garbage_to_the_next_frame() {
        let frame = ShellFrame::new(Kind::Stdout, 1, b"hi".to_vec());
        let mut bytes = b"tail of an old frame F".to_vec();
        bytes.extend(frame.encode());
        let mut d = FrameDecoder::new();
        assert_eq!(d.push(&bytes), vec![frame]);
        assert!(d.skipped() > 0);
    }

    #[test]
    fn splits_big_data() {
        let data = vec![b'x'; MAX_PAYLOAD * 2 + 5];
        let mut d = FrameDecoder::new();
        let frames = d.push(&ShellFrame::data(Kind::Stdout, 3, &data));
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames.iter().map(|f| f.payload.len()).sum::<usize>(),
            data.len()
        );
    }
}
