//! The guest's service and its liveness check.
//!
//! The service is started once and never restarted: a VM whose service died
//! is reported as such (`service_exit` in the status) and the host decides
//! what to do. It runs in its own process group so that shutdown reaches the
//! whole tree a wrapper shell may have started.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent_proto::{Liveness, Reply};

use crate::agent::Agent;
use crate::reaper::lock;

/// How often liveness is checked until it first passes.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(50);
/// Timeout of one TCP liveness probe.
const TCP_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// An exec liveness probe running longer than this is killed and failed.
const EXEC_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often liveness is checked once it has passed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Failures in a row after which a live service is reported not live.
const RECHECK_FAILURES: u32 = 3;
/// How long to wait before saying liveness has not passed yet.
const COMPLAIN_AFTER: Duration = Duration::from_secs(30);

/// Starts the configured service, if any, and a thread that records its exit.
pub fn start(agent: &Arc<Agent>) {
    let argv = match &agent.config.service {
        Some(argv) if !argv.is_empty() => argv,
        Some(_) => {
            info!("the configured service is an empty command; running none");
            return;
        }
        None => return,
    };
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(agent.child_env())
        .stdin(Stdio::null())
        .process_group(0);
    let spawned = match agent.reaper.spawn(&mut command) {
        Ok(spawned) => spawned,
        Err(e) => {
            info!("cannot start the service '{}': {e}", argv[0]);
            exited(agent, 127);
            return;
        }
    };
    let pid = spawned.child.id() as i32;
    lock(&agent.service).pid = Some(pid);
    // For `ferry shell`, which enters the service's namespaces.
    let pid_file = std::path::Path::new(crate::shell::SERVICE_PID_FILE);
    if let Some(dir) = pid_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(pid_file, format!("{pid}\n"));
    debug!("service started, pid {pid}");
    let agent_for_thread = Arc::clone(agent);
    let watcher = std::thread::Builder::new()
        .name("service".into())
        .spawn(move || {
            // The sender lives in the reaper's table until the pid is reaped,
            // so this only fails if the reaper itself is gone.
            let code = spawned.exit.recv().unwrap_or(-1);
            info!("service exited with code {code}");
            exited(&agent_for_thread, code);
        });
    if let Err(e) = watcher {
        info!("cannot watch the service: {e}");
    }
}

/// Records the service's exit and tells the host.
fn exited(agent: &Agent, code: i32) {
    {
        let mut service = lock(&agent.service);
        service.pid = None;
        service.exit = Some(code);
    }
    agent.service_exited.notify_all();
    agent.outbox.event(&Reply::Status(agent.status()));
}

/// Stops the service for shutdown: SIGTERM to its process group, up to
/// `grace` to exit, then SIGKILL.
pub fn stop(agent: &Agent, grace: Duration) {
    let Some(pid) = lock(&agent.service).pid else {
        return;
    };
    agent.reaper.signal_group(pid, libc::SIGTERM);
    if wait_exit(agent, grace) {
        return;
    }
    info!("the service ignored SIGTERM for {grace:?}; killing it");
    agent.reaper.signal_group(pid, libc::SIGKILL);
    wait_exit(agent, Duration::from_secs(1));
}

/// Waits until the service has no running pid. Returns whether it exited.
fn wait_exit(agent: &Agent, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut service = lock(&agent.service);
    while service.pid.is_some() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        service = agent
            .service_exited
            .wait_timeout(service, left)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
    true
}

/// Starts the thread that checks liveness until it first passes, then
/// reports the guest live.
pub fn watch_liveness(agent: &Arc<Agent>) {
    let agent_for_thread = Arc::clone(agent);
    let spawned = std::thread::Builder::new()
        .name("liveness".into())
        .spawn(move || {
            let agent = agent_for_thread;
            let started = Instant::now();
            let mut complained = false;
            let mut probe = Probe::default();
            while !probe.passes(&agent) {
                if !complained && started.elapsed() >= COMPLAIN_AFTER {
                    info!("not live yet after {COMPLAIN_AFTER:?}; still checking");
                    complained = true;
                }
                std::thread::sleep(LIVENESS_INTERVAL);
            }
            agent.live.store(true, Ordering::SeqCst);
            info!("live");
            // Armed before the host hears "live": a request it sends at
            // once must already find the agent hung (the test raced).
            crate::agent::arm_test_hang();
            announce_live(&agent);
            keep_checking(&agent, &mut probe);
        });
    if let Err(e) = spawned {
        info!("cannot start the liveness check: {e}");
    }
}

/// Checks liveness on after the service first passed, every
/// [`RECHECK_INTERVAL`], for `ferry watch`: after [`RECHECK_FAILURES`]
/// failures in a row the guest is no longer live and the host gets a
/// `status` event saying so; a pass makes it live again (a `live` event).
/// Stops once the service has exited (its exit is reported already).
fn keep_checking(agent: &Agent, probe: &mut Probe) {
    let mut failures = 0;
    loop {
        std::thread::sleep(RECHECK_INTERVAL);
        if lock(&agent.service).exit.is_some() {
            return;
        }
        if probe.passes(agent) {
            failures = 0;
            if !agent.live.swap(true, Ordering::SeqCst) {
                info!("live again");
                announce_live(agent);
            }
        } else {
            failures += 1;
            if failures == RECHECK_FAILURES && agent.live.swap(false, Ordering::SeqCst) {
                info!("the service failed its liveness check {RECHECK_FAILURES} times in a row");
                agent.outbox.event(&Reply::Status(agent.status()));
            }
        }
    }
}

/// Sends the `live` event.
pub fn announce_live(agent: &Agent) {
    agent.outbox.event(&Reply::Live {
        uptime_ms: crate::sys::uptime_ms(),
    });
}

/// One liveness check after another, remembering what was already logged.
#[derive(Default)]
struct Probe {
    /// A probe command that cannot be spawned is logged once, not every 50 ms.
    spawn_error_logged: bool,
}

impl Probe {
    fn passes(&mut self, agent: &Agent) -> bool {
        match &agent.config.liveness {
            Liveness::None => true,
            Liveness::Tcp { port } => {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
                TcpStream::connect_timeout(&addr, TCP_PROBE_TIMEOUT).is_ok()
            }
            Liveness::Exec { argv } => self.exec_passes(agent, argv),
        }
    }

    fn exec_passes(&mut self, agent: &Agent, argv: &[String]) -> bool {
        let Some((program, args)) = argv.split_first() else {
            if !self.spawn_error_logged {
                info!("the liveness command is empty; never live");
                self.spawn_error_logged = true;
            }
            return false;
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(agent.child_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let spawned = match agent.reaper.spawn(&mut command) {
            Ok(spawned) => spawned,
            Err(e) => {
                if !self.spawn_error_logged {
                    info!("cannot run the liveness command '{program}': {e}");
                    self.spawn_error_logged = true;
                }
                return false;
            }
        };
        let pid = spawned.child.id() as i32;
        match spawned.exit.recv_timeout(EXEC_PROBE_TIMEOUT) {
            Ok(code) => code == 0,
            Err(_) => {
                agent.reaper.signal_group(pid, libc::SIGKILL);
                let _ = spawned.exit.recv();
                false
            }
        }
    }
}
