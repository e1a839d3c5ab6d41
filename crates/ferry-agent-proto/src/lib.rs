//! The protocol spoken between ferry on the host and `ferry-agent` in the guest.
//!
//! The transport is a virtio-serial port named [`PORT_NAME`]. Frames are single
//! lines of JSON (see [`encode`] / [`Decoder`]): a line-based framing
//! resynchronises by itself after a host disconnects mid-frame, which happens
//! whenever a VM is snapshotted and resumed by a new engine process. Every
//! frame carries the protocol version `v`; see `docs/agent-protocol.md`.
#![warn(missing_docs)]

pub mod shell;

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Version of this protocol (its major number, carried in every frame as
/// `v`). A peer refuses frames of any other version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Minor version: additions that older peers can live without (new request
/// types, optional fields). The agent reports it in [`Reply::Hello`] so that
/// a host can tell whether a request is understood before sending it; an
/// agent that predates a request answers it with [`Reply::Error`] anyway.
///
/// * 0: the original set of requests.
/// * 1: [`Request::SetFleet`].
/// * 2: `background` in [`Request::AfterResume`].
pub const PROTOCOL_MINOR: u32 = 2;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "ferry.agent";

/// Largest frame either side accepts, in bytes (before the newline).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Cap on each captured output stream of an `exec`, in bytes.
pub const MAX_EXEC_OUTPUT: usize = 4 * 1024 * 1024;

/// Where the guest configuration lives inside the guest's root filesystem.
pub const GUEST_CONFIG_PATH: &str = "/ferry/agent.json";

/// Where the agent writes the fleet ([`FleetFile`]) on [`Request::SetFleet`].
/// This file is how programs in the guest find the other members of their
/// fleet; it lives on `/run` (tmpfs), so a cold boot starts without one.
pub const FLEET_FILE_PATH: &str = "/run/ferry/fleet.json";

/// Most members a fleet may have.
pub const MAX_FLEET_MEMBERS: usize = 1024;

/// A request from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Request {
    /// Opens a session; the agent answers [`Reply::Hello`].
    Hello {
        /// Version of ferry on the host, for the guest's logs.
        host_version: String,
    },
    /// Reports the guest's current [`GuestStatus`].
    Status,
    /// Runs a command in the guest and returns its exit status and output.
    Exec {
        /// Program and arguments; the program is looked up in `PATH`.
        argv: Vec<String>,
        /// Bytes fed to the command's standard input (base64), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stdin_b64: Option<String>,
        /// Kill the command after this many milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Prepares for a snapshot: sync file systems and optionally drop caches
    /// (with `init_on_free=1` freed pages are zero, which keeps packages small).
    BeforeSuspend {
        /// Also drop the page cache and slab caches.
        #[serde(default)]
        drop_caches: bool,
    },
    /// Tells the guest it has just been resumed from a snapshot.
    AfterResume {
        /// Host wall-clock time, nanoseconds since the Unix epoch.
        unix_time_ns: u64,
        /// Fresh entropy (hex) to mix into the kernel's RNG.
        entropy_hex: String,
        /// New identity, given to clones so that no two look alike.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<Identity>,
        /// Do the work at the guest's idle priority, after whatever its
        /// service has to do: the guest was paused briefly (a live move, a
        /// save that failed), so its clock lags by about that pause, not by
        /// the hours a package may have waited, and on a just-resumed guest
        /// this work slowed its service's first answers. Since minor
        /// version 2; older agents do it at once.
        #[serde(default, skip_serializing_if = "is_false")]
        background: bool,
    },
    /// Stops the service, syncs and powers the guest off.
    Shutdown,
    /// Tells the guest which fleet it belongs to; the agent writes it to
    /// [`FLEET_FILE_PATH`] and answers [`Reply::FleetSet`]. Each request
    /// replaces the whole list. Since minor version 1.
    SetFleet {
        /// The guest's own name in the fleet.
        self_name: String,
        /// The members (the guest itself may be one of them), each with the
        /// address the guest reaches it at, normally `172.100.100.1:PORT`.
        members: Vec<FleetMember>,
    },
}

/// One member of a fleet, as sent in [`Request::SetFleet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetMember {
    /// The member's name (a ferry VM name).
    pub name: String,
    /// Numeric `IP:PORT` at which the guest reaches the member's service.
    pub addr: String,
}

/// The fleet as the agent writes it to [`FLEET_FILE_PATH`]:
/// `{"self": "...", "members": {"name": "addr", ...}, "updated_unix": N}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetFile {
    /// The guest's own name.
    #[serde(rename = "self")]
    pub self_name: String,
    /// Member name → `IP:PORT`, sorted by name.
    pub members: BTreeMap<String, String>,
    /// When the agent wrote the file, seconds since the Unix epoch (guest
    /// clock).
    pub updated_unix: u64,
}

impl FleetFile {
    /// Checks a [`Request::SetFleet`] and turns it into the file's contents.
    ///
    /// # Errors
    /// A one-line message if a name is not a ferry VM name (1-63 characters
    /// of lowercase letters, digits, `-`, `_` and `.`, starting with a letter
    /// or digit), a name appears twice, an address is not a numeric
    /// `IP:PORT` (the guest never resolves names), or there are more than
    /// [`MAX_FLEET_MEMBERS`] members.
    pub fn from_request(
        self_name: &str,
        members: &[FleetMember],
        updated_unix: u64,
    ) -> Result<Self, String> {
        check_member_name(self_name).map_err(|e| format!("self_name: {e}"))?;
        if members.len() > MAX_FLEET_MEMBERS {
            return Err(format!(
                "{} members is more than the {MAX_FLEET_MEMBERS} a fleet may have",
                members.len()
            ));
        }
        let mut map = BTreeMap::new();
        for member in members {
            check_member_name(&member.name)?;
            let addr: std::net::SocketAddr = member.addr.parse().map_err(|_| {
                format!(
                    "member '{}': '{}' is not a numeric IP:PORT address",
                    member.name, member.addr
                )
            })?;
            if addr.port() == 0 {
                return Err(format!("member '{}': port 0 is not a port", member.name));
            }
            if map.insert(member.name.clone(), addr.to_string()).is_some() {
                return Err(format!("member '{}' is listed twice", member.name));
            }
        }
        Ok(Self {
            self_name: self_name.to_owned(),
            members: map,
            updated_unix,
        })
    }
}

/// Checks a fleet member name: the rule for ferry VM names.
fn check_member_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a VM name (1-63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit)"
        ))
    }
}

/// Identity a guest takes after resume (clones get a fresh one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// New hostname.
    pub hostname: String,
    /// New `/etc/machine-id` (32 hex digits).
    pub machine_id: String,
}

/// A message from the agent to the host: a reply to a request (`id` set) or
/// an unsolicited event (`id` 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello {
        /// Protocol version the agent speaks.
        protocol_version: u32,
        /// Its minor version ([`PROTOCOL_MINOR`]); 0 from agents that
        /// predate minor versions.
        #[serde(default)]
        protocol_minor: u32,
        /// The agent's own version.
        agent_version: String,
        /// Current state of the guest.
        status: GuestStatus,
    },
    /// Answer to [`Request::Status`]; also sent as an event when it changes.
    Status(GuestStatus),
    /// Event: the service passed its liveness check.
    Live {
        /// Milliseconds since the guest kernel booted.
        uptime_ms: u64,
    },
    /// Answer to [`Request::Exec`].
    ExecResult {
        /// Exit code, or `128 + signal` when killed by a signal.
        exit_code: i32,
        /// Standard output (base64), capped at [`MAX_EXEC_OUTPUT`].
        stdout_b64: String,
        /// Standard error (base64), capped at [`MAX_EXEC_OUTPUT`].
        stderr_b64: String,
        /// Whether output was cut at the cap.
        truncated: bool,
        /// Whether the command was killed for exceeding its timeout.
        timed_out: bool,
    },
    /// Answer to [`Request::BeforeSuspend`].
    Quiesced {
        /// Milliseconds the sync (and cache drop) took.
        took_ms: u64,
    },
    /// Answer to [`Request::AfterResume`].
    Resumed {
        /// How far the guest clock was stepped, in milliseconds.
        clock_step_ms: i64,
        /// Whether the entropy was credited to the kernel RNG.
        rng_reseeded: bool,
        /// Current state of the guest, re-announced.
        status: GuestStatus,
    },
    /// Answer to [`Request::Shutdown`]; the guest powers off next.
    ShuttingDown,
    /// Answer to [`Request::SetFleet`]: the fleet file is written.
    FleetSet,
    /// The request failed.
    Error {
        /// What went wrong, in one line.
        message: String,
    },
}

/// What the agent knows about its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestStatus {
    /// Whether the service has passed its liveness check.
    pub live: bool,
    /// Milliseconds since the guest kernel booted.
    pub uptime_ms: u64,
    /// The guest's hostname.
    pub hostname: String,
    /// Exit code of the service if it has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exit: Option<i32>,
}

/// One frame on the wire: version, request id and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame<T> {
    /// Protocol version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Request id; replies echo it, events use 0.
    pub id: u64,
    /// The message.
    pub body: T,
}

/// How the agent judges that the service is live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Liveness {
    /// A TCP connection to `127.0.0.1:port` is accepted.
    Tcp {
        /// The port to connect to.
        port: u16,
    },
    /// The command exits with status 0.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// Live as soon as the agent runs (no service).
    None,
}

/// The guest's configuration, written into its root file system by the
/// blueprint builder at [`GUEST_CONFIG_PATH`] and read by the agent at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// The service to start and keep running, if any.
    #[serde(default)]
    pub service: Option<Vec<String>>,
    /// Environment for the service and for `exec`.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// How liveness is judged.
    pub liveness: Liveness,
    /// Run a shell on the serial console (when the agent is PID 1), so that
    /// a host forwarding its terminal to the console (`--enable-input`)
    /// reaches something.
    #[serde(default = "default_true")]
    pub console_shell: bool,
}

fn default_true() -> bool {
    true
}

/// Errors decoding a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The line is not valid JSON for this message type.
    Malformed(String),
    /// The frame has another protocol version.
    Version(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed frame: {e}"),
            DecodeError::Version(v) => write!(
                f,
                "agent protocol version {v} is not supported (this side speaks {PROTOCOL_VERSION})"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Encodes one frame as a newline-terminated JSON line.
pub fn encode<T: Serialize>(id: u64, body: &T) -> Vec<u8> {
    let frame = Frame {
        v: PROTOCOL_VERSION,
        id,
        body,
    };
    let mut line = serde_json::to_vec(&frame).expect("protocol messages always serialise");
    line.push(b'\n');
    line
}

/// Decodes one line (without its newline) into a frame.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<Frame<T>, DecodeError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    let version: VersionOnly =
        serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if version.v != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version.v));
    }
    serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// Splits a byte stream into lines, bounded by [`MAX_FRAME`]. An overlong line
/// is dropped whole, so one bad frame cannot wedge the stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    discarding: bool,
}

impl Decoder {
    /// Creates an empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any partial line (after the other side went away).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }

    /// Adds bytes and returns every complete line now available.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            if !self.discarding {
                self.buf.extend_from_slice(&data[..pos]);
                let line = std::mem::take(&mut self.buf);
                if !line.is_empty() {
                    lines.push(line);
                }
            }
            self.discarding = false;
            self.buf.clear();
            data = &data[pos + 1..];
        }
        if !self.discarding {
            self.buf.extend_from_slice(data);
            if self.buf.len() > MAX_FRAME {
                self.buf.clear();
                self.discarding = true;
            }
        }
        lines
    }
}

/// Cuts a base64 `*_b64` field to at most `max_bytes` decoded bytes (whole
/// base64 quanta); whether it cut. The host applies it to what a guest's
/// agent sends ([`MAX_EXEC_OUTPUT`]): the agent caps its output too, but a
/// guest is not trusted to.
pub fn cap_b64(b64: &mut String, max_bytes: usize) -> bool {
    if b64.len() <= max_bytes.div_ceil(3) * 4 {
        return false;
    }
    // Base64 is ASCII, so a well-formed field is cut exactly there; a
    // guest may send any text, so cut on a character boundary (found by
    // fuzzing: cutting inside a multi-byte character panicked the host).
    let mut end = max_bytes / 3 * 4;
    while !b64.is_char_boundary(end) {
        end -= 1;
    }
    b64.truncate(end);
    true
}

/// Base64-encodes bytes for the `*_b64` fields.
pub fn b64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes a `*_b64` field.
pub fn b64_decode(text: &str) -> Result<Vec<u8>, DecodeError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| DecodeError::Malformed(format!("bad base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_request() {
        let requests = vec![
            Request::Hello {
                host_version: "0.1.0".into(),
            },
            Request::Status,
            Request::Exec {
                argv: vec!["echo".into(), "hi".into()],
                stdin_b64: Some(b64_encode(b"in")),
                timeout_ms: Some(5),
            },
            Request::BeforeSuspend { drop_caches: true },
            Request::AfterResume {
                unix_time_ns: 1,
                entropy_hex: "00ff".into(),
                identity: Some(Identity {
                    hostname: "h".into(),
                    machine_id: "0".repeat(32),
                }),
                background: false,
            },
            Request::AfterResume {
                unix_time_ns: 2,
                entropy_hex: String::new(),
                identity: None,
                background: true,
            },
            Request::Shutdown,
            Request::SetFleet {
                self_name: "a".into(),
                members: vec![FleetMember {
                    name: "b".into(),
                    addr: "172.100.100.1:18001".into(),
                }],
            },
        ];
        for (i, r) in requests.into_iter().enumerate() {
            let line = encode(i as u64, &r);
            assert_eq!(*line.last().unwrap(), b'\n');
            let frame: Frame<Request> = decode(&line[..line.len() - 1]).unwrap();
            assert_eq!(frame.id, i as u64);
            assert_eq!(frame.body, r);
        }
    }

    #[test]
    fn set_fleet_has_the_documented_shape() {
        let request = Request::SetFleet {
            self_name: "web-1".into(),
            members: vec![FleetMember {
                name: "web-2".into(),
                addr: "172.100.100.1:18002".into(),
            }],
        };
        let line = encode(3, &request);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"v\":1,\"id\":3,\"body\":{\"type\":\"set-fleet\",\"self_name\":\"web-1\",\"members\":[{\"name\":\"web-2\",\"addr\":\"172.100.100.1:18002\"}]}}\n"
        );
        let reply = encode(3, &Reply::FleetSet);
        assert_eq!(
            std::str::from_utf8(&reply).unwrap(),
            "{\"v\":1,\"id\":3,\"body\":{\"type\":\"fleet-set\"}}\n"
        );
    }

    #[test]
    fn an_urgent_after_resume_is_written_as_before_minor_two() {
        // An older agent reads what it always read; `background` is only
        // written when set, and read as false when absent.
        let request = Request::AfterResume {
            unix_time_ns: 5,
            entropy_hex: "ab".into(),
            identity: None,
            background: false,
        };
        let line = encode(4, &request);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"v\":1,\"id\":4,\"body\":{\"type\":\"after-resume\",\"unix_time_ns\":5,\"entropy_hex\":\"ab\"}}\n"
        );
        let background = encode(
            4,
            &Request::AfterResume {
                unix_time_ns: 5,
                entropy_hex: "ab".into(),
                identity: None,
                background: true,
            },
        );
        assert!(std::str::from_utf8(&background)
            .unwrap()
            .contains("\"background\":true"));
    }

    #[test]
    fn a_hello_from_an_older_agent_has_minor_zero() {
        let line = br#"{"v":1,"id":1,"body":{"type":"hello","protocol_version":1,"agent_version":"0.1.0","status":{"live":false,"uptime_ms":1,"hostname":"h"}}}"#;
        let frame: Frame<Reply> = decode(line).unwrap();
        assert!(matches!(
            frame.body,
            Reply::Hello {
                protocol_minor: 0,
                ..
            }
        ));
    }

    #[test]
    fn fleet_file_from_a_request() {
        let member = |name: &str, addr: &str| FleetMember {
            name: name.into(),
            addr: addr.into(),
        };
        let file = FleetFile::from_request(
            "a",
            &[
                member("c", "172.100.100.1:18003"),
                member("a", "172.100.100.1:18001"),
            ],
            42,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            r#"{"self":"a","members":{"a":"172.100.100.1:18001","c":"172.100.100.1:18003"},"updated_unix":42}"#
        );
        assert_eq!(
            FleetFile::from_request("a", &[], 1).unwrap().members.len(),
            0
        );

        let bad = [
            ("A", vec![]),
            ("", vec![]),
            ("a", vec![member("b c", "1.2.3.4:5")]),
            ("a", vec![member("b", "web-2:80")]),
            ("a", vec![member("b", "1.2.3.4")]),
            ("a", vec![member("b", "1.2.3.4:0")]),
            (
                "a",
                vec![member("b", "1.2.3.4:5"), member("b", "1.2.3.4:6")],
            ),
        ];
        for (self_name, members) in bad {
            assert!(
                FleetFile::from_request(self_name, &members, 1).is_err(),
                "{self_name} {members:?}"
            );
        }
    }

    #[test]
    fn rejects_other_versions() {
        let line = br#"{"v":2,"id":1,"body":{"type":"status"}}"#;
        assert_eq!(
            decode::<Request>(line).unwrap_err(),
            DecodeError::Version(2)
        );
    }

    #[test]
    fn exec_output_caps_cut_whole_quanta_and_never_inside_a_character() {
        let mut fits = b64_encode(b"123456");
        assert!(!cap_b64(&mut fits, 6));
        let mut long = b64_encode(b"123456789");
        assert!(cap_b64(&mut long, 6));
        assert_eq!(b64_decode(&long).unwrap(), b"123456");
        // Not base64 at all, with a 4-byte character across the cut.
        let mut hostile = "UFF\u{1F4A9}E9ORwo=".to_string();
        assert!(cap_b64(&mut hostile, 3));
        assert_eq!(hostile, "UFF");
    }

    #[test]
    fn decoder_resynchronises_after_garbage() {
        let mut d = Decoder::new();
        let mut lines = d.push(b"partial garb");
        assert!(lines.is_empty());
        lines = d.push(b"age\n{\"v\":1");
        assert_eq!(lines, vec![b"partial garbage".to_vec()]);
        assert!(decode::<Request>(&lines[0]).is_err());
        lines = d.push(b",\"id\":3,\"body\":{\"type\":\"status\"}}\n");
        let f: Frame<Request> = decode(&lines[0]).unwrap();
        assert_eq!(f.id, 3);
    }

    #[test]
    fn decoder_drops_overlong_lines() {
        let mut d = Decoder::new();
        let big = vec![b'x'; MAX_FRAME + 10];
        assert!(d.push(&big).is_empty());
        let lines = d.push(b"tail\nok\n");
        assert_eq!(lines, vec![b"ok".to_vec()]);
    }
}
