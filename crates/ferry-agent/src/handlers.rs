//! Answers to the host's requests.
//!
//! `hello` and `status` are answered on the reader thread: they are quick,
//! and the host uses them to probe whether the agent is responsive. So is
//! an urgent `after-resume` (a few system calls, on the critical path of a
//! resume); a background one goes to the idle worker. Every other request
//! runs on a thread of its own so that a long `exec` or `sync` never delays
//! them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent_proto::{
    b64_decode, b64_encode, decode, DecodeError, Identity, Reply, Request, PROTOCOL_MINOR,
    PROTOCOL_VERSION,
};

use crate::agent::Agent;
use crate::exec::{self, ExecRequest};
use crate::{fleet, service, sys};

/// How long the service gets to stop on shutdown before SIGKILL.
const SERVICE_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for its reply to leave before powering off.
const REPLY_FLUSH: Duration = Duration::from_secs(1);
/// The kernel command-line word that delays a clone's identity files by
/// [`TEST_SLOW_IDENTITY`]: a test-only hook that shows an `exec` sent right
/// after the after-resume answer still sees them.
pub const TEST_SLOW_IDENTITY_FLAG: &str = "ferry.test.slow-identity";
const TEST_SLOW_IDENTITY: Duration = Duration::from_secs(3);
/// How long a request waits for work left from an earlier one. That work
/// runs at idle priority, so a guest whose CPU is saturated slows it down;
/// it is a few small file writes.
const TRAILING_WAIT: Duration = Duration::from_secs(10);

/// Handles one line read from the port.
pub fn handle_line(agent: &Arc<Agent>, line: &[u8]) {
    let epoch = agent.outbox.epoch();
    match decode::<Request>(line) {
        Ok(frame) => dispatch(agent, frame.id, epoch, frame.body),
        Err(e) => match (frame_id(line), &e) {
            // Another protocol version: say so, so the host can report it
            // instead of timing out.
            (Some(id), DecodeError::Version(_)) => {
                info!("{e}");
                agent.outbox.reply(
                    id,
                    epoch,
                    &Reply::Error {
                        message: e.to_string(),
                    },
                );
            }
            // Our version and an id, but a body we do not know (a newer
            // host's request type, a missing field): answer rather than
            // leave the host waiting.
            (Some(id), DecodeError::Malformed(_)) if id != 0 => {
                info!("request {id}: {e}");
                agent.outbox.reply(
                    id,
                    epoch,
                    &Reply::Error {
                        message: e.to_string(),
                    },
                );
            }
            // Not a frame at all (line noise, a partial line from a host
            // that went away): nobody to answer.
            _ => info!("ignoring a line that is not a frame: {e}"),
        },
    }
}

/// The `id` of a line that failed to decode, if it has one.
fn frame_id(line: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    value.get("id")?.as_u64()
}

fn dispatch(agent: &Arc<Agent>, id: u64, epoch: u64, request: Request) {
    match request {
        Request::Hello { host_version } => {
            debug!("request {id}: hello from ferry {host_version}");
            let reply = Reply::Hello {
                protocol_version: PROTOCOL_VERSION,
                protocol_minor: PROTOCOL_MINOR,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                status: agent.status(),
            };
            agent.outbox.reply(id, epoch, &reply);
        }
        Request::Status => {
            debug!("request {id}: status");
            agent
                .outbox
                .reply(id, epoch, &Reply::Status(agent.status()));
        }
        Request::Exec {
            argv,
            stdin_b64,
            timeout_ms,
        } => {
            debug!("request {id}: exec {argv:?}");
            in_thread(agent, id, epoch, "exec", move |agent| {
                exec_reply(agent, argv, stdin_b64, timeout_ms)
            });
        }
        Request::BeforeSuspend { drop_caches } => {
            debug!("request {id}: before-suspend (drop caches: {drop_caches})");
            in_thread(agent, id, epoch, "suspend", move |agent| {
                before_suspend(agent, drop_caches)
            });
        }
        Request::AfterResume {
            unix_time_ns,
            entropy_hex,
            identity,
            background,
        } => {
            debug!("request {id}: after-resume (background: {background})");
            if background {
                // After what the service has to do first.
                let worker = Arc::clone(agent);
                agent.idle.run(move || {
                    resumed(&worker, id, epoch, unix_time_ns, &entropy_hex, identity);
                });
            } else {
                // On the reader thread, like `hello` and `status`: it is a
                // few system calls, and the thread that ran it before cost
                // the service's first answer after a resume about 30 ms
                // under TCG here (every path of a resumed guest is
                // translated anew, thread creation's among them).
                resumed(agent, id, epoch, unix_time_ns, &entropy_hex, identity);
            }
        }
        Request::SetFleet { self_name, members } => {
            debug!("request {id}: set-fleet ({} member(s))", members.len());
            in_thread(agent, id, epoch, "fleet", move |agent| {
                fleet::set(&agent.fleet_file, &self_name, &members)
            });
        }
        Request::Shutdown => {
            debug!("request {id}: shutdown");
            let agent = Arc::clone(agent);
            let spawned = std::thread::Builder::new()
                .name("shutdown".into())
                .spawn(move || shutdown(&agent, id, epoch));
            if let Err(e) = spawned {
                info!("cannot start shutdown: {e}");
            }
        }
    }
}

/// Answers `after-resume`, says `live` again (so that a host that just
/// restored the VM hears it in order), and hands a clone's identity files
/// to the idle worker: writing them beside the service's first requests
/// cost those about 65 ms under TCG. They are marked pending before the
/// answer goes, so that an `exec` sent after it waits for them.
fn resumed(
    agent: &Arc<Agent>,
    id: u64,
    epoch: u64,
    unix_time_ns: u64,
    entropy_hex: &str,
    identity: Option<Identity>,
) {
    let reply = answer(id, "resume", || {
        after_resume(agent, unix_time_ns, entropy_hex, identity.as_ref())
    });
    let resumed = matches!(reply, Reply::Resumed { .. });
    let announce = resumed && agent.live.load(Ordering::SeqCst);
    let files = match identity {
        Some(identity) if resumed => Some((agent.trailing.begin(), identity)),
        _ => None,
    };
    agent.outbox.reply(id, epoch, &reply);
    if announce {
        service::announce_live(agent);
    }
    if let Some((work, identity)) = files {
        agent.idle.run(move || {
            let _work = work;
            if crate::agent::test_flag(TEST_SLOW_IDENTITY_FLAG) {
                std::thread::sleep(TEST_SLOW_IDENTITY);
            }
            write_identity_files(&identity);
        });
    }
}

/// `handler`'s reply to request `id`; a panic becomes an `error` reply
/// naming `what` instead of silence.
fn answer(id: u64, what: &str, handler: impl FnOnce() -> Reply) -> Reply {
    catch_unwind(AssertUnwindSafe(handler)).unwrap_or_else(|_| {
        info!("request {id} ({what}) panicked");
        Reply::Error {
            message: format!("the agent failed while handling {what}"),
        }
    })
}

/// Runs `handler` on its own thread and sends its reply. A panic becomes an
/// `error` reply instead of silence.
fn in_thread<F>(agent: &Arc<Agent>, id: u64, epoch: u64, name: &str, handler: F)
where
    F: FnOnce(&Arc<Agent>) -> Reply + Send + 'static,
{
    let worker = Arc::clone(agent);
    let what = name.to_owned();
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let agent = worker;
            let reply = answer(id, &what, || handler(&agent));
            agent.outbox.reply(id, epoch, &reply);
        });
    if let Err(e) = spawned {
        info!("request {id}: cannot start a thread: {e}");
        let message = format!("the agent cannot start a thread: {e}");
        agent.outbox.reply(id, epoch, &Reply::Error { message });
    }
}

fn exec_reply(
    agent: &Arc<Agent>,
    argv: Vec<String>,
    stdin_b64: Option<String>,
    timeout_ms: Option<u64>,
) -> Reply {
    let stdin = match stdin_b64.as_deref().map(b64_decode).transpose() {
        Ok(stdin) => stdin,
        Err(e) => {
            return Reply::Error {
                message: format!("exec stdin: {e}"),
            }
        }
    };
    wait_for_trailing(agent);
    let request = ExecRequest {
        argv,
        env: agent.child_env(),
        stdin,
        timeout: timeout_ms.map(Duration::from_millis),
    };
    match exec::run(&agent.reaper, request) {
        Ok(out) => Reply::ExecResult {
            exit_code: out.exit_code,
            stdout_b64: b64_encode(&out.stdout),
            stderr_b64: b64_encode(&out.stderr),
            truncated: out.truncated,
            timed_out: out.timed_out,
        },
        Err(message) => Reply::Error { message },
    }
}

/// Waits for work left from an earlier answer (a clone's identity files),
/// so that what the host asks next sees it done.
fn wait_for_trailing(agent: &Agent) {
    if !agent.trailing.wait(TRAILING_WAIT) {
        info!(
            "work left from an earlier request is still running after {} s; going on",
            TRAILING_WAIT.as_secs()
        );
    }
}

/// Syncs (and drops caches) so that the snapshot holds a consistent disk
/// state and, with `init_on_free=1`, as many zero pages as possible.
fn before_suspend(agent: &Agent, drop_caches: bool) -> Reply {
    let started = Instant::now();
    wait_for_trailing(agent);
    sys::sync();
    if drop_caches {
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
            info!("cannot drop caches: {e}");
        }
    }
    Reply::Quiesced {
        took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// Brings a resumed (possibly cloned) guest up to date: clock, RNG and,
/// for clones, identity. Everything is validated before anything changes.
fn after_resume(
    agent: &Agent,
    unix_time_ns: u64,
    entropy_hex: &str,
    identity: Option<&Identity>,
) -> Reply {
    let entropy = match parse_hex(entropy_hex) {
        Ok(entropy) => entropy,
        Err(e) => {
            return Reply::Error {
                message: format!("after-resume entropy: {e}"),
            }
        }
    };
    if let Some(identity) = identity {
        if let Err(e) = validate_identity(identity) {
            return Reply::Error {
                message: format!("after-resume identity: {e}"),
            };
        }
    }

    let clock_step_ms = match step_clock(unix_time_ns) {
        Ok(step) => step,
        Err(e) => {
            info!("cannot set the clock: {e}");
            0
        }
    };
    let rng_reseeded = reseed(&entropy);
    if let Some(identity) = identity {
        if let Err(e) = sys::set_hostname(&identity.hostname) {
            info!("cannot set the hostname: {e}");
        }
    }
    Reply::Resumed {
        clock_step_ms,
        rng_reseeded,
        status: agent.status(),
    }
}

/// Steps the wall clock to the host's time; returns the step in ms.
fn step_clock(unix_time_ns: u64) -> std::io::Result<i64> {
    let guest = sys::realtime_ns()?;
    let step_ns = i128::from(unix_time_ns) - guest;
    sys::set_realtime_ns(unix_time_ns)?;
    Ok(i64::try_from(step_ns / 1_000_000).unwrap_or(i64::MAX))
}

/// Credits the host's entropy to the kernel RNG; if that is refused, mixes
/// it in uncredited. Returns whether it was credited and the CRNG reseeded.
fn reseed(entropy: &[u8]) -> bool {
    if entropy.is_empty() {
        return false;
    }
    match sys::add_entropy(entropy) {
        Ok(()) => true,
        Err(e) => {
            info!("cannot credit entropy ({e}); mixing it in uncredited");
            if let Err(e) = sys::write_urandom(entropy) {
                info!("cannot write to /dev/urandom: {e}");
            }
            false
        }
    }
}

/// Writes a clone's hostname and machine id to their files (the kernel's
/// hostname was set before the answer). The files may live on a read-only
/// root: failures are logged, not fatal.
fn write_identity_files(identity: &Identity) {
    for (path, value) in [
        ("/etc/hostname", &identity.hostname),
        ("/etc/machine-id", &identity.machine_id),
    ] {
        if let Err(e) = std::fs::write(path, format!("{value}\n")) {
            info!("cannot write {path}: {e}");
        }
    }
}

/// Decodes a hex string (either case, even length).
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    fn digit(b: u8) -> Option<u8> {
        char::from(b).to_digit(16).map(|d| d as u8)
    }
    if !text.len().is_multiple_of(2) {
        return Err("odd number of hex digits".to_owned());
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(format!("'{}' is not hex", String::from_utf8_lossy(pair))),
        })
        .collect()
}

/// Checks a new identity: a hostname the kernel accepts (1-64 characters of
/// letters, digits, `-` and `.`) and a machine id of 32 lowercase hex digits
/// as `machine-id(5)` requires.
pub fn validate_identity(identity: &Identity) -> Result<(), String> {
    let host = &identity.hostname;
    let host_ok = (1..=64).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !host_ok {
        return Err(format!("'{host}' is not a valid hostname"));
    }
    let id = &identity.machine_id;
    let id_ok = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !id_ok {
        return Err(format!(
            "'{id}' is not a machine id (32 lowercase hex digits)"
        ));
    }
    Ok(())
}

/// Replies, stops the service, syncs and powers off (or, outside a guest,
/// exits). Runs once; a repeated request is just acknowledged.
fn shutdown(agent: &Arc<Agent>, id: u64, epoch: u64) {
    if agent.shutting_down.swap(true, Ordering::SeqCst) {
        agent.outbox.reply(id, epoch, &Reply::ShuttingDown);
        return;
    }
    info!("shutting down");
    // Queue the reply first; the service stops while it is being written.
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let agent = Arc::clone(agent);
        let sender = std::thread::Builder::new()
            .name("shutdown-reply".into())
            .spawn(move || {
                let _ = tx.send(agent.outbox.reply_and_wait(
                    id,
                    epoch,
                    &Reply::ShuttingDown,
                    REPLY_FLUSH * 10,
                ));
            });
        if let Err(e) = sender {
            info!("cannot send the shutdown reply: {e}");
        }
    }
    service::stop(agent, SERVICE_STOP_GRACE);
    wait_for_trailing(agent);
    if sys::is_pid1() {
        // Whatever else runs (exec leftovers, daemons) must not write after
        // the final sync. kill(-1) spares PID 1 itself.
        let _ = sys::kill(-1, libc::SIGKILL);
    }
    sys::sync();
    if rx.recv_timeout(REPLY_FLUSH) != Ok(true) {
        debug!("the shutdown reply was not written (no host connected?)");
    }
    if sys::is_pid1() {
        info!("powering off");
        sys::power_off();
    }
    info!("exiting (not PID 1)");
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex() {
        assert_eq!(parse_hex("00ffA0"), Ok(vec![0, 255, 160]));
        assert_eq!(parse_hex(""), Ok(vec![]));
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
    }

    #[test]
    fn validates_identities() {
        let ok = Identity {
            hostname: "web-1.example".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        };
        assert!(validate_identity(&ok).is_ok());
        let bad_host = Identity {
            hostname: "a b".into(),
            ..ok.clone()
        };
        assert!(validate_identity(&bad_host).is_err());
        let bad_id = Identity {
            machine_id: "0123456789ABCDEF0123456789ABCDEF".into(),
            ..ok
        };
        assert!(validate_identity(&bad_id).is_err());
    }

    #[test]
    fn finds_the_id_of_an_undecodable_frame() {
        assert_eq!(frame_id(br#"{"v":2,"id":9,"body":{}}"#), Some(9));
        assert_eq!(frame_id(b"garbage"), None);
    }
}
