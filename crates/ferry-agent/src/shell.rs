//! The shell server: `ferry-agent --shell-server`.
//!
//! `/ferry/init` starts it in the background before it hands PID 1 to the
//! agent, so it is a process of its own: a hung or busy agent, a dead
//! service or a guest network that is down do not reach it. It owns the
//! virtio-serial port [`SHELL_PORT_NAME`] and serves any number of sessions
//! on it (`ferry_agent_proto::shell`): each one a command or ferry's busybox
//! `sh`, on a PTY of its own (or on pipes), in its own session and process
//! group, inside the service's namespaces when the service has its own.
//!
//! The host going away (its reads return end-of-file) or saying `Hello`
//! again hangs up every session: nothing a client started stays behind
//! except what the user detached himself (`nohup`, `setsid`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent_proto::shell::{
    FrameDecoder, Kind, OpenRequest, Opened, PortHello, ShellFrame, SHELL_PORT_NAME,
    SHELL_PROTOCOL_VERSION,
};
use ferry_agent_proto::GuestConfig;

use crate::agent::CHILD_PATH;
use crate::port::{self, PortReader};
use crate::reaper::lock;

/// ferry's own static busybox: the shell and tools of every session, whatever
/// the image holds.
pub const BUSYBOX: &str = "/ferry/bin/busybox";

/// Where the agent writes the service's pid, for the shell to find its
/// namespaces.
pub const SERVICE_PID_FILE: &str = "/run/ferry/service.pid";

/// The namespaces a session enters when the service's differ from the
/// server's (the order matters: `mnt` last of those that change paths).
const NAMESPACES: [(&str, libc::c_int); 5] = [
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
];

/// How long a hung-up session gets between SIGHUP and SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(1);

/// How long output is still forwarded after a session's command exited
/// (its background children may hold the terminal open for ever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(300);

/// A running session, as the reader loop sees it.
struct Session {
    /// The session leader's pid (also its process group).
    pid: i32,
    /// Where input, end of input and resizes go (a thread writes them).
    input: Sender<Input>,
}

enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(u16, u16),
}

struct Server {
    out: Sender<Vec<u8>>,
    sessions: Mutex<HashMap<u32, Session>>,
    /// Environment of every session.
    env: Vec<(String, String)>,
}

/// Runs the shell server for ever; `explicit` is a port path (tests).
pub fn serve(explicit: Option<&Path>) -> ! {
    info!(
        "shell server (protocol {SHELL_PROTOCOL_VERSION}, pid {})",
        std::process::id()
    );
    loop {
        let (reader, writer) = port::open_named_when_ready(explicit, SHELL_PORT_NAME);
        let (out, rx) = mpsc::channel::<Vec<u8>>();
        let spawned = std::thread::Builder::new()
            .name("shell-writer".into())
            .spawn(move || {
                let mut writer = writer;
                for bytes in rx {
                    if writer.write_all(&bytes).is_err() {
                        // A dead port: the reader sees it too and reopens.
                        continue;
                    }
                    let _ = writer.flush();
                }
            });
        if let Err(e) = spawned {
            info!("shell server: cannot start the writer: {e}");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let server = Arc::new(Server {
            out,
            sessions: Mutex::new(HashMap::new()),
            env: session_env(),
        });
        read_loop(&server, reader);
        server.hang_up_all();
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The environment of a session: ferry's `PATH` (its busybox last), the
/// service's own environment, a home and a prompt.
fn session_env() -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), CHILD_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
        ("PS1".to_owned(), "\\h:\\w\\$ ".to_owned()),
    ];
    if let Ok(text) = std::fs::read(ferry_agent_proto::GUEST_CONFIG_PATH) {
        if let Ok(config) = serde_json::from_slice::<GuestConfig>(&text) {
            env.extend(config.env);
        }
    }
    env
}

fn read_loop(server: &Arc<Server>, mut reader: PortReader) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut connected = false;
    let mut errors = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                if connected {
                    debug!("shell: host disconnected");
                    server.hang_up_all();
                    connected = false;
                }
                decoder.reset();
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(n) => {
                connected = true;
                errors = 0;
                for frame in decoder.push(&buf[..n]) {
                    server.handle(frame);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                errors += 1;
                info!("shell server: reading the port failed: {e}");
                if errors >= 10 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Server {
    fn send(&self, frame: &ShellFrame) {
        let _ = self.out.send(frame.encode());
    }

    fn handle(self: &Arc<Self>, frame: ShellFrame) {
        let id = frame.session;
        match frame.kind {
            Kind::Hello => {
                self.hang_up_all();
                self.send(&ShellFrame::json(
                    Kind::Hello,
                    0,
                    &PortHello {
                        v: SHELL_PROTOCOL_VERSION,
                        who: format!("ferry-agent {}", env!("CARGO_PKG_VERSION")),
                    },
                ));
            }
            Kind::Ping => self.send(&ShellFrame::new(Kind::Pong, id, frame.payload)),
            Kind::Open => {
                // `open` itself sends `opened`, before any output.
                let opened = match frame.parse::<OpenRequest>() {
                    Ok(request) => self.open(id, &request),
                    Err(e) => Err(e),
                };
                if let Err(message) = opened {
                    self.send(&ShellFrame::new(Kind::OpenFailed, id, message.into_bytes()));
                }
            }
            Kind::Stdin | Kind::StdinEof | Kind::Resize => {
                let input = match frame.kind {
                    Kind::Stdin => Input::Data(frame.payload),
                    Kind::StdinEof => Input::Eof,
                    _ => match frame.size() {
                        Some((rows, cols)) => Input::Resize(rows, cols),
                        None => return,
                    },
                };
                if let Some(s) = lock(&self.sessions).get(&id) {
                    let _ = s.input.send(input);
                }
            }
            Kind::Close => {
                if let Some(s) = lock(&self.sessions).remove(&id) {
                    hang_up(s.pid);
                }
            }
            Kind::Opened
            | Kind::OpenFailed
            | Kind::Stdout
            | Kind::Stderr
            | Kind::Exit
            | Kind::Pong => {}
        }
    }

    /// Hangs up every session (the host is gone or started over).
    fn hang_up_all(&self) {
        let sessions: Vec<Session> = lock(&self.sessions).drain().map(|(_, s)| s).collect();
        for s in sessions {
            hang_up(s.pid);
        }
    }

    /// Starts a session and sends `opened` (before any of its output).
    fn open(self: &Arc<Self>, id: u32, request: &OpenRequest) -> Result<(), String> {
        if lock(&self.sessions).contains_key(&id) {
            return Err(format!("session {id} is open already"));
        }
        let (namespaces, entered) = service_namespaces();
        let mut command = match &request.argv {
            Some(argv) if !argv.is_empty() => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
            Some(_) => return Err("empty command".into()),
            None => {
                let mut c = Command::new(BUSYBOX);
                c.arg0("-sh");
                c
            }
        };
        command.env_clear().envs(self.env.iter().cloned());
        command.env(
            "TERM",
            request
                .term
                .as_deref()
                .filter(|t| !t.is_empty())
                .unwrap_or("vt100"),
        );
        command.current_dir("/");
        let ns_fds: Vec<(RawFd, libc::c_int)> = namespaces
            .iter()
            .map(|(f, flag)| (f.as_raw_fd(), *flag))
            .collect();
        let tty = request.tty;
        let mut master = None;
        if tty {
            let (m, slave) =
                open_pty(request.rows, request.cols).map_err(|e| format!("openpty: {e}"))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
            command
                .stdin(dup(&slave).map_err(|e| e.to_string())?)
                .stdout(dup(&slave).map_err(|e| e.to_string())?)
                .stderr(Stdio::from(slave));
            master = Some(m);
        } else {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (signal, setns, setsid, ioctl)
        // on descriptors the parent keeps open until after the spawn.
        unsafe {
            command.pre_exec(move || {
                // `/ferry/init` started the server with `&`, which ignores
                // SIGINT and SIGQUIT; a session's programs need them (Ctrl-C).
                for sig in 1..32 {
                    if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                }
                for (fd, flag) in &ns_fds {
                    if libc::setns(*fd, *flag) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            let what = request
                .argv
                .as_ref()
                .and_then(|a| a.first())
                .map_or(BUSYBOX, String::as_str);
            format!("cannot start {what}: {e}")
        })?;
        drop(namespaces);
        // The command's own stdio ends are the child's now.
        drop(command);
        let pid = child.id() as i32;
        self.send(&ShellFrame::json(
            Kind::Opened,
            id,
            &Opened { pid, entered },
        ));
        let (input_tx, input_rx) = mpsc::channel::<Input>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        match master {
            Some(master) => {
                let master = File::from(master);
                let writer = master.try_clone().map_err(|e| e.to_string())?;
                self.spawn_output(id, Kind::Stdout, master, done_tx.clone());
                spawn_input(input_rx, Some(writer), None);
            }
            None => {
                let stdout = child.stdout.take().expect("piped");
                let stderr = child.stderr.take().expect("piped");
                let stdin = child.stdin.take().expect("piped");
                self.spawn_output(id, Kind::Stdout, stdout, done_tx.clone());
                self.spawn_output(id, Kind::Stderr, stderr, done_tx.clone());
                spawn_input(input_rx, None, Some(stdin));
            }
        }
        drop(done_tx);
        let streams = if tty { 1 } else { 2 };
        lock(&self.sessions).insert(
            id,
            Session {
                pid,
                input: input_tx,
            },
        );
        let server = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name(format!("shell-{id}"))
            .spawn(move || {
                let code = match child.wait() {
                    Ok(status) => {
                        use std::os::unix::process::ExitStatusExt;
                        status
                            .code()
                            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
                    }
                    Err(_) => -1,
                };
                // Output first, then the exit code; but never wait for ever
                // on a terminal that a background child keeps open.
                for _ in 0..streams {
                    if done_rx.recv_timeout(DRAIN_AFTER_EXIT).is_err() {
                        break;
                    }
                }
                lock(&server.sessions).remove(&id);
                server.send(&ShellFrame::exit(id, code));
            });
        Ok(())
    }

    fn spawn_output(
        self: &Arc<Self>,
        id: u32,
        kind: Kind,
        mut from: impl Read + Send + 'static,
        done: Sender<()>,
    ) {
        let out = self.out.clone();
        let _ = std::thread::Builder::new()
            .name(format!("shell-out-{id}"))
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match from.read(&mut buf) {
                        // EIO: every holder of the terminal's other side closed it.
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.send(ShellFrame::data(kind, id, &buf[..n])).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = done.send(());
            });
    }
}

/// The thread that feeds a session's input, so that a full terminal never
/// blocks the port's reader.
fn spawn_input(
    rx: mpsc::Receiver<Input>,
    master: Option<File>,
    stdin: Option<std::process::ChildStdin>,
) {
    let _ = std::thread::Builder::new()
        .name("shell-in".into())
        .spawn(move || {
            let mut master = master;
            let mut stdin = stdin;
            for input in rx {
                match input {
                    Input::Data(bytes) => {
                        if let Some(m) = master.as_mut() {
                            let _ = m.write_all(&bytes);
                        } else if let Some(s) = stdin.as_mut() {
                            let _ = s.write_all(&bytes);
                        }
                    }
                    // On a terminal, end of input is what Ctrl-D types.
                    Input::Eof => {
                        if let Some(m) = master.as_mut() {
                            let _ = m.write_all(&[4]);
                        }
                        stdin = None;
                    }
                    Input::Resize(rows, cols) => {
                        if let Some(m) = master.as_ref() {
                            let _ = set_size(m.as_raw_fd(), rows, cols);
                        }
                    }
                }
            }
        });
}

/// SIGHUP to the session's process group, SIGKILL after [`HANGUP_GRACE`].
fn hang_up(pid: i32) {
    // SAFETY: kill(2) with plain integers; a negative pid names the group.
    unsafe { libc::kill(-pid, libc::SIGHUP) };
    // SAFETY: as above; SIGCONT wakes a stopped job so it sees the SIGHUP.
    unsafe { libc::kill(-pid, libc::SIGCONT) };
    let _ = std::thread::Builder::new()
        .name("shell-hangup".into())
        .spawn(move || {
            std::thread::sleep(HANGUP_GRACE);
            // SAFETY: as above. The group may be gone (ESRCH): fine.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        });
}

/// A new PTY of `rows` x `cols`: (master, slave), both close-on-exec.
fn open_pty(rows: u16, cols: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let size = libc::winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the out-pointers are valid for writes; the name buffer may be
    // null; `size` is a valid winsize the call only reads.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are open descriptors nobody else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

/// TIOCSWINSZ: the kernel sends the terminal's foreground group SIGWINCH.
fn set_size(fd: RawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `size` is a valid winsize the ioctl only reads.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The service's namespaces that differ from this process's, opened, and
/// their names. None when the service has none of its own (the usual case)
/// or is not running.
fn service_namespaces() -> (Vec<(File, libc::c_int)>, Vec<String>) {
    let Some(pid) = std::fs::read_to_string(SERVICE_PID_FILE)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    else {
        return (Vec::new(), Vec::new());
    };
    let mut fds = Vec::new();
    let mut names = Vec::new();
    for (name, flag) in NAMESPACES {
        let theirs = format!("/proc/{pid}/ns/{name}");
        let ours = format!("/proc/self/ns/{name}");
        let (Ok(a), Ok(b)) = (std::fs::read_link(&theirs), std::fs::read_link(&ours)) else {
            continue;
        };
        if a == b {
            continue;
        }
        if let Ok(f) = File::open(&theirs) {
            fds.push((f, flag));
            names.push(name.to_owned());
        }
    }
    (fds, names)
}
