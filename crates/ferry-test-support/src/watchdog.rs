//! A time limit for one test, so that a hung test fails the run instead of
//! hanging it.
//!
//! libtest (stable) has no per-test timeout. Every VM test takes the VM lock
//! ([`crate::vm_lock`]), which arms [`time_limit`] once the lock is held, so
//! time spent waiting for another test's VM (perhaps another checkout's) is
//! not counted. Past the limit the watchdog names the test, kills the
//! processes the test started (ferry, and with it its QEMU), and exits the
//! test binary with status 101: `cargo test` then ends with that binary's
//! failure. `scripts/test.sh` bounds everything else (each test binary, and
//! the whole run) with `timeout`.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The limit for one VM test unless `$FERRY_TEST_TIME_LIMIT_S` says
/// otherwise. The longest (the migration chain) takes about 3 minutes here.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(600);

/// The per-test limit: `$FERRY_TEST_TIME_LIMIT_S` seconds, or
/// [`DEFAULT_LIMIT`].
pub fn configured_limit() -> Duration {
    std::env::var("FERRY_TEST_TIME_LIMIT_S")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIMIT)
}

/// An armed time limit; dropping it (the test finished) disarms it.
pub struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// Arms a time limit of `limit` for the calling test (named after its
/// thread, as libtest names it). See the module documentation.
pub fn time_limit(limit: Duration) -> Watchdog {
    let name = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let watched = done.clone();
    std::thread::Builder::new()
        .name(format!("watchdog {name}"))
        .spawn(move || {
            let (lock, cv) = &*watched;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (guard, _) = cv
                .wait_timeout_while(guard, limit, |done| !*done)
                .unwrap_or_else(|p| p.into_inner());
            if *guard {
                return;
            }
            // Straight to the descriptor: libtest captures eprintln! of
            // the test's threads and would drop it when the process exits.
            let _ = writeln!(
                std::io::stderr(),
                "\nferry-test-support: test '{name}' exceeded its time limit of {} s \
                 (FERRY_TEST_TIME_LIMIT_S); killing the processes it started and \
                 failing this test binary",
                limit.as_secs()
            );
            kill_descendants(std::process::id());
            std::process::exit(101);
        })
        .expect("spawn the watchdog thread");
    Watchdog { done }
}

/// SIGKILLs every process below `root` (children first found, then theirs).
/// A ferry killed this way takes its QEMU along (QEMU dies with its parent).
fn kill_descendants(root: u32) {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The fields after the command name, which may hold spaces.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            if let Some(ppid) = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut doomed = vec![root];
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        doomed.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    for pid in doomed.into_iter().skip(1) {
        crate::send_signal(pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_that_ends_in_time_disarms_it() {
        let w = time_limit(Duration::from_millis(300));
        drop(w);
        std::thread::sleep(Duration::from_millis(600));
        // Still running: the watchdog did not fire.
    }

    /// Run by `a_hung_test_is_killed_and_named` in a process of its own.
    #[test]
    #[ignore = "hangs on purpose; run by a_hung_test_is_killed_and_named"]
    fn hangs_past_its_limit() {
        let _w = time_limit(Duration::from_millis(500));
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        std::fs::write(
            std::env::var("FERRY_WATCHDOG_TEST_PID_FILE").unwrap(),
            child.id().to_string(),
        )
        .unwrap();
        let _ = child.wait();
    }

    #[test]
    fn a_hung_test_is_killed_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let started = std::time::Instant::now();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "watchdog::tests::hangs_past_its_limit",
            ])
            .env("FERRY_WATCHDOG_TEST_PID_FILE", &pid_file)
            .output()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(101));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("test 'watchdog::tests::hangs_past_its_limit' exceeded its time limit"),
            "{stderr}"
        );
        // The child it started is gone too.
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "sleep {pid} still runs: {state}"
        );
    }
}
