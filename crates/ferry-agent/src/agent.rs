//! The agent's shared state and its main loop.

use std::io::{ErrorKind, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ferry_agent_proto::{Decoder, GuestConfig, GuestStatus, Liveness};

use crate::cli::Options;
use crate::outbox::Outbox;
use crate::port::{self, PortReader};
use crate::reaper::{lock, Reaper};
use crate::{console, handlers, service, sys};

/// `PATH` for every child, before the configuration's own environment
/// (which may override it). `/ferry/bin` holds tools shipped with ferry.
pub const CHILD_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/ferry/bin";

/// What the agent knows about the service.
#[derive(Debug, Default)]
pub struct ServiceState {
    /// Its pid while it runs.
    pub pid: Option<i32>,
    /// Its exit code once it has exited (127 if it never started).
    pub exit: Option<i32>,
}

/// State shared by every thread of the agent.
pub struct Agent {
    /// The guest configuration.
    pub config: GuestConfig,
    /// Set when the configuration could not be loaded: the agent then runs
    /// no service and never reports live, but still answers the host, which
    /// can `exec` to find out what is wrong.
    pub config_error: Option<String>,
    /// The reaper, through which every child is started.
    pub reaper: Reaper,
    /// The queue of outgoing frames.
    pub outbox: Outbox,
    /// Whether the service has passed its liveness check.
    pub live: AtomicBool,
    /// The service's pid and exit code.
    pub service: Mutex<ServiceState>,
    /// Signalled when the service exits.
    pub service_exited: Condvar,
    /// Set once shutdown has begun, so that it runs only once.
    pub shutting_down: AtomicBool,
    /// Where `set-fleet` writes the fleet file.
    pub fleet_file: PathBuf,
    /// Work left over from an answered request (a clone's identity files),
    /// which later requests that can observe it wait for.
    pub trailing: Trailing,
    /// Runs work at the guest's idle priority.
    pub idle: IdleWorker,
}

type Job = Box<dyn FnOnce() + Send>;

/// One thread at the guest's idle priority, made when the agent starts,
/// that runs the work handed to it in order. A resumed guest's agent was
/// started before its snapshot, so the work after a resume makes no thread:
/// on a just-resumed guest under TCG, where every path is translated anew,
/// making one (for the request and again for its trailing work) delayed the
/// service's first answer by about 30 ms here.
pub struct IdleWorker {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
}

impl IdleWorker {
    /// Starts the thread. Without it (the guest refused a thread), each
    /// job gets a thread of its own.
    pub fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("idle".into())
            .spawn(move || {
                if let Err(e) = sys::run_when_idle() {
                    info!("cannot lower the idle worker's priority: {e}");
                }
                while let Ok(job) = rx.recv() {
                    if catch_unwind(AssertUnwindSafe(job)).is_err() {
                        info!("a job of the idle worker panicked");
                    }
                }
            });
        let jobs = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                info!("cannot start the idle worker: {e}; idle work gets threads of its own");
                None
            }
        };
        IdleWorker { jobs }
    }

    /// Runs `job` at idle priority, after the jobs handed over before it.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let job = match &self.jobs {
            Some(jobs) => match jobs.send(job) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let spawned = std::thread::Builder::new()
            .name("idle-job".into())
            .spawn(move || {
                if let Err(e) = sys::run_when_idle() {
                    debug!("cannot lower an idle job's priority: {e}");
                }
                job();
            });
        if let Err(e) = spawned {
            info!("cannot start a thread for idle work: {e}");
        }
    }
}

/// Work that runs after its request was answered, at the guest's idle
/// priority, so that it does not compete with the service's first requests
/// after a resume. Requests that could see its effect (`exec`, suspend,
/// shutdown) wait for it first, so that from the host it looks as if it had
/// been done before the answer.
#[derive(Default)]
pub struct Trailing(Arc<TrailingState>);

#[derive(Default)]
struct TrailingState {
    pending: Mutex<usize>,
    done: Condvar,
}

/// Marks one piece of trailing work; dropping it (even in a panic's unwind)
/// ends it.
pub struct TrailingWork(Arc<TrailingState>);

impl Trailing {
    /// Marks work as pending until the returned guard is dropped. Call it
    /// before the answer is sent, so that no later request misses it.
    pub fn begin(&self) -> TrailingWork {
        *lock(&self.0.pending) += 1;
        TrailingWork(Arc::clone(&self.0))
    }

    /// Waits until no trailing work is pending, for at most `limit`.
    /// Returns whether it all ended.
    pub fn wait(&self, limit: Duration) -> bool {
        let pending = lock(&self.0.pending);
        let (pending, _) = self
            .0
            .done
            .wait_timeout_while(pending, limit, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *pending == 0
    }
}

impl Drop for TrailingWork {
    fn drop(&mut self) {
        let mut pending = lock(&self.0.pending);
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.0.done.notify_all();
        }
    }
}

impl Agent {
    /// The guest's current status.
    pub fn status(&self) -> GuestStatus {
        GuestStatus {
            live: self.live.load(Ordering::SeqCst),
            uptime_ms: sys::uptime_ms(),
            hostname: sys::hostname(),
            service_exit: lock(&self.service).exit,
        }
    }

    /// The environment of every child: [`CHILD_PATH`], then the
    /// configuration's `env`. Nothing is inherited from the agent, whose
    /// environment is whatever the kernel and init script left.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("PATH".to_owned(), CHILD_PATH.to_owned())];
        env.extend(self.config.env.iter().cloned());
        env
    }
}

/// Loads the guest configuration.
fn load_config(path: &Path) -> Result<GuestConfig, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("bad config {}: {e}", path.display()))
}

/// One line describing the configuration, for the start-up log.
fn summary(config: &GuestConfig) -> String {
    let service = match &config.service {
        Some(argv) if !argv.is_empty() => argv.join(" "),
        _ => "none".to_owned(),
    };
    let liveness = match &config.liveness {
        Liveness::Tcp { port } => format!("tcp {port}"),
        Liveness::Exec { argv } => format!("exec {}", argv.join(" ")),
        Liveness::None => "none".to_owned(),
    };
    format!("service: {service}; liveness: {liveness}")
}

/// Runs the agent. Never returns normally: shutdown ends the process.
pub fn run(options: Options) {
    let (config, config_error) = match load_config(&options.config) {
        Ok(config) => (config, None),
        Err(e) => {
            let fallback = GuestConfig {
                service: None,
                env: Vec::new(),
                liveness: Liveness::None,
                // A console to look around on is what a broken guest needs.
                console_shell: true,
            };
            (fallback, Some(e))
        }
    };
    let version = env!("CARGO_PKG_VERSION");
    match &config_error {
        None => info!(
            "version {version} (protocol {}, pid {}): {}",
            ferry_agent_proto::PROTOCOL_VERSION,
            std::process::id(),
            summary(&config)
        ),
        Some(e) => info!(
            "version {version} (protocol {}, pid {}): {e}; running without a service, never live",
            ferry_agent_proto::PROTOCOL_VERSION,
            std::process::id(),
        ),
    }

    let reaper = loop {
        match Reaper::start() {
            Ok(reaper) => break reaper,
            Err(e) => {
                info!("cannot start the reaper: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let agent = Arc::new(Agent {
        config,
        config_error,
        reaper,
        outbox: Outbox::new(),
        live: AtomicBool::new(false),
        service: Mutex::new(ServiceState::default()),
        service_exited: Condvar::new(),
        shutting_down: AtomicBool::new(false),
        fleet_file: options.fleet_file.clone(),
        trailing: Trailing::default(),
        idle: IdleWorker::start(),
    });

    if agent.config_error.is_none() {
        service::start(&agent);
        service::watch_liveness(&agent);
    }
    if sys::is_pid1() && agent.config.console_shell {
        console::start(&agent);
    }

    // The port loop restarts after a panic or a dead port: without it the
    // host cannot reach the guest at all.
    loop {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            serve_port(&agent, options.port.as_deref())
        }));
        if outcome.is_err() {
            info!("the port loop panicked; reopening the port");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Opens the port and reads requests until the port fails for good.
fn serve_port(agent: &Arc<Agent>, explicit: Option<&Path>) {
    let (reader, writer) = port::open_when_ready(explicit);
    if let Err(e) = agent.outbox.attach(writer) {
        info!("cannot start the port writer: {e}");
        return;
    }
    read_requests(agent, reader);
    // Let go of the port before it is opened again.
    agent.outbox.detach(Duration::from_secs(1));
}

/// Set (test hook) once the agent is to stop answering the host.
static HANG: AtomicBool = AtomicBool::new(false);

/// The kernel command-line word that makes the agent hang once live: a
/// test-only hook that shows `ferry shell` works with a hung agent. The
/// agent keeps reaping and running the service; it just never reads
/// another request.
pub const TEST_HANG_FLAG: &str = "ferry.test.hang-agent";

/// Whether the kernel command line holds the test-only word `flag` (only
/// for the agent as PID 1, in a guest).
pub fn test_flag(flag: &str) -> bool {
    sys::is_pid1()
        && std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .split_whitespace()
            .any(|w| w == flag)
}

/// Arms the hang hook if the kernel command line asks for it.
pub fn arm_test_hang() {
    if test_flag(TEST_HANG_FLAG) {
        info!("{TEST_HANG_FLAG}: no longer answering the host (test hook)");
        HANG.store(true, Ordering::SeqCst);
    }
}

/// How long to wait before reading again while the host is not connected.
const DISCONNECTED_POLL: Duration = Duration::from_millis(10);

/// Consecutive read errors after which the port is reopened.
const MAX_READ_ERRORS: u32 = 10;

/// The reader loop. A virtio-serial `read` returns 0 at once while no host is
/// connected, so end-of-file is not the end: the partial line is dropped (the
/// host that sent it is gone), the epoch moves on, and reading resumes.
fn read_requests(agent: &Arc<Agent>, mut reader: PortReader) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut connected = true;
    let mut errors = 0;
    loop {
        let read = reader.read(&mut buf);
        while HANG.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(3600));
        }
        match read {
            Ok(0) => {
                if connected {
                    debug!("host disconnected");
                    agent.outbox.host_gone();
                    connected = false;
                }
                decoder.reset();
                std::thread::sleep(DISCONNECTED_POLL);
            }
            Ok(n) => {
                connected = true;
                errors = 0;
                for line in decoder.push(&buf[..n]) {
                    handlers::handle_line(agent, &line);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                errors += 1;
                info!("reading the port failed: {e}");
                if errors >= MAX_READ_ERRORS {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_the_config() {
        let config = GuestConfig {
            service: Some(vec!["redis-server".into(), "--port".into(), "6379".into()]),
            env: Vec::new(),
            liveness: Liveness::Tcp { port: 6379 },
            console_shell: false,
        };
        assert_eq!(
            summary(&config),
            "service: redis-server --port 6379; liveness: tcp 6379"
        );
    }

    #[test]
    fn a_wait_for_trailing_work_ends_when_the_last_piece_does() {
        let trailing = Trailing::default();
        assert!(trailing.wait(Duration::ZERO), "nothing pending at first");
        let first = trailing.begin();
        let second = trailing.begin();
        assert!(!trailing.wait(Duration::from_millis(20)));
        drop(first);
        assert!(!trailing.wait(Duration::from_millis(20)), "one piece left");
        let ended = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(second);
        });
        let started = std::time::Instant::now();
        assert!(trailing.wait(Duration::from_secs(5)));
        assert!(started.elapsed() >= Duration::from_millis(40));
        ended.join().unwrap();
    }

    #[test]
    fn the_idle_worker_runs_jobs_in_order_and_outlives_a_panic() {
        let worker = IdleWorker::start();
        let (tx, rx) = std::sync::mpsc::channel();
        let first = tx.clone();
        worker.run(move || first.send(1).unwrap());
        worker.run(|| panic!("a job failed"));
        worker.run(move || tx.send(2).unwrap());
        let got: Vec<i32> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(got, [1, 2]);
    }

    #[test]
    fn a_panic_ends_its_trailing_work() {
        let trailing = Arc::new(Trailing::default());
        let work = trailing.begin();
        let _ = std::thread::spawn(move || {
            let _work = work;
            panic!("the writer failed");
        })
        .join();
        assert!(trailing.wait(Duration::from_secs(1)));
    }
}
