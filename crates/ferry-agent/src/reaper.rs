//! The zombie reaper.
//!
//! As PID 1 the agent inherits every orphan in the guest, so one thread calls
//! `wait` for any child, forever. The agent's own children (the service, exec
//! commands, liveness probes) must therefore never be waited for with std's
//! `Child::wait` — the reaper would steal the status. Instead they are
//! started with [`Reaper::spawn`], which registers the pid and hands back a
//! channel on which the reaper delivers the exit code.
//!
//! Two races are closed:
//!
//! * A child may exit before its pid is registered. The reaper first peeks
//!   at a zombie with `waitid(WNOWAIT)` and only reaps it while holding the
//!   spawn lock, which [`Reaper::spawn`] holds from fork to registration.
//!   The same lock keeps the reaper away from a child that std reaps itself
//!   when `exec` fails inside `Command::spawn` (std asserts that its own
//!   `waitpid` succeeds). [`StatusTable`] also keeps unclaimed statuses for a
//!   while, so a late registration still gets its status.
//! * A pid may be reused after it is reaped. [`Reaper::signal_group`] sends a
//!   signal only while the pid is still registered and unreaped, checked
//!   under the same lock.
//!
//! When the agent is not PID 1 (tests on the host) the same code reaps just
//! the agent's own children.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an unclaimed exit status is kept. Orphans reparented to PID 1
/// are never claimed, so the table must forget them; a registration comes
/// microseconds after the fork, so a minute is generous.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// Locks a mutex, ignoring poisoning: a panicked worker thread must not take
/// the agent down with it, and every value guarded here stays consistent
/// between statements.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Who is waiting for which pid, and statuses nobody has claimed yet.
/// Pure bookkeeping, separate from the system calls so it can be tested.
#[derive(Debug, Default)]
pub struct StatusTable {
    waiting: HashMap<i32, Sender<i32>>,
    unclaimed: HashMap<i32, (i32, Instant)>,
    /// Bumped on each registration, so an idle reaper knows to look again.
    generation: u64,
}

impl StatusTable {
    /// Registers interest in `pid`; its exit code arrives on the receiver,
    /// at once if it was already recorded.
    pub fn register(&mut self, pid: i32) -> Receiver<i32> {
        let (tx, rx) = mpsc::channel();
        self.generation += 1;
        match self.unclaimed.remove(&pid) {
            Some((code, _)) => {
                let _ = tx.send(code);
            }
            None => {
                self.waiting.insert(pid, tx);
            }
        }
        rx
    }

    /// Records that `pid` exited with `code`, delivering it to its waiter or
    /// keeping it for a later registration.
    pub fn record(&mut self, pid: i32, code: i32, now: Instant) {
        match self.waiting.remove(&pid) {
            // A dropped receiver means nobody cares any more: fine.
            Some(tx) => {
                let _ = tx.send(code);
            }
            None => {
                self.unclaimed
                    .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                self.unclaimed.insert(pid, (code, now));
            }
        }
    }

    /// Whether `pid` is registered and has not exited yet.
    pub fn is_running(&self, pid: i32) -> bool {
        self.waiting.contains_key(&pid)
    }

    /// Number of statuses kept for nobody.
    #[cfg(test)]
    pub fn unclaimed_len(&self) -> usize {
        self.unclaimed.len()
    }
}

#[derive(Default)]
struct Shared {
    /// Held from fork to registration, and while reaping one zombie.
    spawn_lock: Mutex<()>,
    table: Mutex<StatusTable>,
    /// Signalled on registration, to wake a reaper that had no children.
    spawned: Condvar,
}

/// Handle to the reaper thread; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    shared: Arc<Shared>,
}

/// A child started through the reaper.
pub struct Spawned {
    /// The std handle, for its pipes. Never call `wait` on it.
    pub child: Child,
    /// Receives the exit code (or `128 + signal`) once.
    pub exit: Receiver<i32>,
}

impl Reaper {
    /// Starts the reaper thread.
    ///
    /// # Errors
    /// The thread could not be created.
    pub fn start() -> io::Result<Self> {
        let reaper = Self {
            shared: Arc::new(Shared::default()),
        };
        let shared = Arc::clone(&reaper.shared);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&shared))?;
        Ok(reaper)
    }

    /// Spawns `command` and registers its pid, atomically with respect to
    /// the reaper (see the module documentation).
    ///
    /// # Errors
    /// `Command::spawn`'s error: the program could not be started.
    pub fn spawn(&self, command: &mut Command) -> io::Result<Spawned> {
        let _spawning = lock(&self.shared.spawn_lock);
        let child = command.spawn()?;
        let pid = child.id() as i32;
        let exit = lock(&self.shared.table).register(pid);
        self.shared.spawned.notify_all();
        Ok(Spawned { child, exit })
    }

    /// Sends `signal` to the process group led by `pid` (children are put in
    /// their own group so that a shell's children go too), but only while
    /// `pid` has not been reaped, so a recycled pid is never hit. Returns
    /// whether the signal was sent.
    pub fn signal_group(&self, pid: i32, signal: libc::c_int) -> bool {
        let _no_reaping = lock(&self.shared.spawn_lock);
        if !lock(&self.shared.table).is_running(pid) {
            return false;
        }
        match crate::sys::kill(-pid, signal) {
            Ok(()) => true,
            // The leader exists but is not a group leader (not started by
            // `spawn` with a process group): signal it alone.
            Err(_) => crate::sys::kill(pid, signal).is_ok(),
        }
    }
}

fn reap_forever(shared: &Shared) {
    loop {
        let generation = lock(&shared.table).generation;
        match wait_any() {
            Ok(pid) => reap(shared, pid),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                // No children at all: sleep until one is spawned. Orphans
                // reparented to PID 1 are found by the timeout.
                let table = lock(&shared.table);
                if table.generation == generation {
                    let _ = shared
                        .spawned
                        .wait_timeout(table, Duration::from_millis(100));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                info!("reaper: waitid failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Blocks until some child has exited and returns its pid, leaving it a
/// zombie (`WNOWAIT`) so that it is reaped under the spawn lock.
fn wait_any() -> io::Result<i32> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid and writable for the call; P_ALL ignores the id.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded with WEXITED, so the kernel filled in a
    // SIGCHLD siginfo whose pid field is valid.
    Ok(unsafe { info.si_pid() })
}

fn reap(shared: &Shared, pid: i32) {
    let _no_spawning = lock(&shared.spawn_lock);
    let mut status = 0;
    // SAFETY: `status` is a valid, writable int for the call.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    // 0 or -1 (ECHILD): std reaped it itself after a failed exec.
    if rc == pid {
        let code = crate::sys::exit_code(status);
        lock(&shared.table).record(pid, code, Instant::now());
    }
}

/// The one reaper of the test process: two reapers in one process would
/// steal each other's statuses.
#[cfg(test)]
pub fn test_reaper() -> &'static Reaper {
    static REAPER: std::sync::OnceLock<Reaper> = std::sync::OnceLock::new();
    REAPER.get_or_init(|| Reaper::start().expect("start reaper"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_recorded_before_registration_is_kept() {
        let mut table = StatusTable::default();
        table.record(42, 3, Instant::now());
        assert!(!table.is_running(42));
        let rx = table.register(42);
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(table.unclaimed_len(), 0);
    }

    #[test]
    fn status_recorded_after_registration_is_delivered() {
        let mut table = StatusTable::default();
        let rx = table.register(7);
        assert!(table.is_running(7));
        assert!(rx.try_recv().is_err());
        table.record(7, 137, Instant::now());
        assert_eq!(rx.try_recv(), Ok(137));
        assert!(!table.is_running(7));
        assert_eq!(table.unclaimed_len(), 0);
    }

    #[test]
    fn unclaimed_statuses_expire() {
        let mut table = StatusTable::default();
        let start = Instant::now();
        table.record(1, 0, start);
        table.record(2, 0, start + UNCLAIMED_TTL + Duration::from_secs(1));
        assert_eq!(table.unclaimed_len(), 1);
        assert!(table.register(1).try_recv().is_err());
    }

    #[test]
    fn reaps_real_children() {
        let reaper = test_reaper();
        let spawned = reaper
            .spawn(Command::new("sh").args(["-c", "exit 5"]))
            .unwrap();
        let code = spawned.exit.recv_timeout(Duration::from_secs(10));
        assert_eq!(code, Ok(5));
    }

    #[test]
    fn signals_only_running_children() {
        use std::os::unix::process::CommandExt;
        let reaper = test_reaper();
        let spawned = reaper
            .spawn(Command::new("sleep").arg("30").process_group(0))
            .unwrap();
        let pid = spawned.child.id() as i32;
        assert!(reaper.signal_group(pid, libc::SIGKILL));
        let code = spawned.exit.recv_timeout(Duration::from_secs(10));
        assert_eq!(code, Ok(128 + libc::SIGKILL));
        assert!(!reaper.signal_group(pid, libc::SIGKILL));
    }

    #[test]
    fn failed_spawn_is_an_error_not_a_panic() {
        let reaper = test_reaper();
        for _ in 0..20 {
            // An absolute path (std may use posix_spawn) and a PATH lookup
            // with a changed PATH (std forks and waits for the failed child
            // itself, which must not race with the reaper).
            assert!(reaper
                .spawn(&mut Command::new("/nonexistent/ferry-test"))
                .is_err());
            assert!(reaper
                .spawn(
                    Command::new("ferry-no-such-program")
                        .env_clear()
                        .env("PATH", "/nonexistent")
                )
                .is_err());
        }
    }
}
