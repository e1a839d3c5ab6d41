//! Test helpers shared by ferry's integration tests.
//!
//! VM tests run one at a time across all test binaries ([`vm_lock`]): two
//! TCG guests on a 2-core machine would slow each other past their
//! timeouts. Blueprints are built once per checkout ([`blueprint`]) and the
//! kernel download and accelerator verdict are cached in one test cache.
//! Static guest binaries that recipes name are built on demand
//! ([`guest_binary`]).
#![warn(missing_docs)]

pub mod hosts;
pub mod netsnap;
pub mod ports;
pub mod watchdog;
pub use hosts::{Host, TestHosts};

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/<name> is two levels down")
        .to_path_buf()
}

/// Where tests keep what they share: blueprints, the cache, the lock.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("FERRY_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/test-fixtures"));
    std::fs::create_dir_all(&dir).expect("create the fixtures dir");
    dir
}

/// The cache all tests share (kernel downloads, debootstrap trees, the
/// accelerator verdict).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("FERRY_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures_dir().join("cache"))
}

/// The static guest agent, built by `scripts/build.sh` (or named by
/// `$FERRY_AGENT`).
pub fn agent_path() -> PathBuf {
    let p = std::env::var_os("FERRY_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/agent/x86_64-unknown-linux-gnu/agent/ferry-agent")
        });
    assert!(
        p.is_file(),
        "the static agent {} is missing: run scripts/build.sh (or scripts/test.sh) first",
        p.display()
    );
    p
}

/// Where `scripts/build.sh` leaves static guest binary `name`.
fn static_build_path(name: &str) -> PathBuf {
    workspace_root()
        .join("target")
        .join(ferry_blueprint::STATIC_TARGET_SUBDIR)
        .join(name)
}

/// A static guest binary of this workspace that a recipe's `[binaries]`
/// names (e.g. `ferry-web`): `$FERRY_BIN_<NAME>` if set, else built here
/// the way `scripts/build.sh` builds it (static glibc, profile `agent`),
/// once per test process so that a changed source is never tested stale.
/// The build is a no-op when `scripts/build.sh` already ran.
pub fn guest_binary(name: &str) -> PathBuf {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

    if let Some(p) = std::env::var_os(ferry_blueprint::HostBinaries::env_var(name)) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{} names {}, which is missing",
            ferry_blueprint::HostBinaries::env_var(name),
            p.display()
        );
        return p;
    }
    let path = static_build_path(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if built
        .get_or_insert_with(HashSet::new)
        .insert(name.to_owned())
    {
        // One cargo at a time across test binaries.
        let _guard = lock_file(&fixtures_dir().join("static-build.lock"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "-q", "--profile", "agent", "-p", name])
            .args(["--target", "x86_64-unknown-linux-gnu", "--target-dir"])
            .arg(workspace_root().join("target/agent"))
            .current_dir(workspace_root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .output()
            .expect("run cargo");
        assert!(
            out.status.success() && path.is_file(),
            "building the static {name} failed (try scripts/build.sh): {}",
            describe(&out)
        );
    }
    path
}

/// The binary names the built-in recipes' `[binaries]` use.
fn recipe_binary_names() -> Vec<String> {
    let mut names: Vec<String> = ferry_blueprint::Recipe::builtin_names()
        .into_iter()
        .filter_map(|r| ferry_blueprint::Recipe::find(r).ok())
        .flat_map(|r| r.binaries.into_values())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// An exclusive lock held for the life of the guard.
pub struct LockGuard(#[allow(dead_code)] File);

fn lock_file(path: &Path) -> LockGuard {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open lock file");
    // SAFETY: flock on a descriptor owned by `f`, which the guard keeps open.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    LockGuard(f)
}

/// The VM lock, held by one test, with that test's time limit.
pub struct VmLock {
    // Disarmed before the lock is released.
    _limit: watchdog::Watchdog,
    _lock: LockGuard,
}

/// Serialises VM tests across threads and test binaries. Once the lock is
/// held, the test's time limit runs ([`watchdog`]). `$FERRY_TEST_VM_LOCK`
/// names another lock file, so that several checkouts on one host (each
/// with its own fixtures) still run one VM test at a time.
pub fn vm_lock() -> VmLock {
    vm_lock_for(watchdog::configured_limit())
}

/// [`vm_lock`] for a test that boots several slow guests in a row: its
/// time limit is `at_least`, or the configured one if that is longer.
pub fn vm_lock_for(at_least: Duration) -> VmLock {
    let path = std::env::var_os("FERRY_TEST_VM_LOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures_dir().join("vm.lock"));
    let lock = lock_file(&path);
    VmLock {
        _limit: watchdog::time_limit(at_least.max(watchdog::configured_limit())),
        _lock: lock,
    }
}

/// The blueprint of a built-in recipe, built once and rebuilt when the
/// agent, the recipe or the test binary (so: ferry's code) changed.
pub fn blueprint(recipe: &str) -> PathBuf {
    let dir = fixtures_dir().join(format!("blueprint-{recipe}"));
    let _guard = lock_file(&fixtures_dir().join(format!("blueprint-{recipe}.lock")));
    let agent = agent_path();
    let stamp = dir.join(".built-from");
    let recipe_file = workspace_root().join(format!("recipes/{recipe}.toml"));
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let found = ferry_blueprint::Recipe::find(recipe).expect("built-in recipe");
    let mut binaries = ferry_blueprint::HostBinaries::new();
    let mut binary_mtimes = Vec::new();
    for name in found.binaries.values() {
        let path = guest_binary(name);
        binary_mtimes.push(mtime(&path));
        binaries.set(name, path);
    }
    let want = format!(
        "{:?}|{:?}|{:?}|{:?}",
        mtime(&agent),
        mtime(&recipe_file),
        std::env::current_exe().ok().and_then(|p| mtime(&p)),
        binary_mtimes,
    );
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return dir;
    }
    let mut progress =
        ferry_blueprint::progress::LineProgress::new(false, |l: &str| eprintln!("{l}"));
    ferry_blueprint::build(ferry_blueprint::BuildOptions {
        recipe: found,
        out: dir.clone(),
        cache_dir: cache_dir(),
        agent,
        binaries,
        force: true,
        progress: &mut progress,
    })
    .unwrap_or_else(|e| panic!("building the {recipe} blueprint failed: {e}"));
    std::fs::write(&stamp, want).expect("write stamp");
    dir
}

/// A private `$FERRY_STATE` for one test, with the shared cache.
pub struct FerryEnv {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The private state directory.
    pub state: tempfile::TempDir,
}

impl FerryEnv {
    /// A new environment for the `ferry` binary at `ferry`.
    pub fn new(ferry: &str) -> Self {
        Self {
            ferry: PathBuf::from(ferry),
            state: tempfile::Builder::new()
                .prefix("ferry-state-")
                .tempdir()
                .expect("temp state dir"),
        }
    }

    /// A `ferry` command with this environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.ferry);
        c.env("FERRY_STATE", self.state.path())
            .env("FERRY_CACHE", cache_dir())
            .env("FERRY_AGENT", agent_path())
            .env_remove("FERRY_LOG");
        // So that `ferry blueprint build` finds the recipes' other binaries
        // where `scripts/build.sh` or [`guest_binary`] left them.
        for name in recipe_binary_names() {
            let var = ferry_blueprint::HostBinaries::env_var(&name);
            let path = std::env::var_os(&var)
                .map(PathBuf::from)
                .unwrap_or_else(|| static_build_path(&name));
            if path.is_file() {
                c.env(var, path);
            }
        }
        c
    }

    /// Runs `ferry ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run ferry")
    }

    /// The state directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state.path().join("vms").join(name)
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one raw line to a VM's control socket and returns the raw reply
/// line: for tests of what the socket does with malformed requests, which
/// the typed client cannot send.
pub fn raw_control_request(socket: &Path, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    conn.write_all(format!("{line}\n").as_bytes())
        .expect("send");
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply).expect("reply");
    reply
}

/// This process's memory cgroup directory, v1 or v2: ferry's, as tests
/// start ferry in the cgroup they run in, so each VM's cgroup is a child.
pub fn own_memory_cgroup() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if controllers.split(',').any(|c| c == "memory") {
            return Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        }
    }
    let line = text.lines().find(|l| l.starts_with("0::")).unwrap();
    Path::new("/sys/fs/cgroup").join(line[3..].trim_start_matches('/'))
}

/// Pids of QEMU processes running the VM named `name`.
pub fn qemu_pids(name: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("ferry:{name} ")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Standard output and error of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Starts `ferry ARGS` (a `boot` without `--exit-when-live`, or later a
/// `run`) and waits until it prints `live in N ms`. Returns the running
/// child (its standard input a pipe the test may write to) and what it
/// printed so far; panics with its stderr if it exits first.
pub fn spawn_until_live(
    env: &FerryEnv,
    args: &[&str],
    timeout: Duration,
) -> (KillOnDrop, Vec<String>) {
    let mut cmd = env.cmd();
    cmd.args(args);
    spawn_until(cmd, "live in ", timeout)
}

/// Like [`spawn_until_live`], but a ferry that exits before it is live is
/// an `Err` with what it said (e.g. for [`ports::retry_on_port_clash`]).
pub fn try_spawn_until_live(
    env: &FerryEnv,
    args: &[&str],
    timeout: Duration,
) -> Result<(KillOnDrop, Vec<String>), String> {
    let mut cmd = env.cmd();
    cmd.args(args);
    try_spawn_until_stamped(cmd, "live in ", timeout).map(|(c, l)| (c, unstamped(l)))
}

/// Starts `cmd` and waits until a line of its standard output starts with
/// `ready` (e.g. a ferry command run inside a test host, see
/// [`Host::ferry`]). Returns as [`spawn_until_live`] does.
pub fn spawn_until(cmd: Command, ready: &str, timeout: Duration) -> (KillOnDrop, Vec<String>) {
    let (child, lines) = spawn_until_stamped(cmd, ready, timeout);
    (child, unstamped(lines))
}

/// Like [`spawn_until`], with the moment each line was read (for tests
/// that relate what a client saw to what ferry was doing then).
pub fn spawn_until_stamped(
    cmd: Command,
    ready: &str,
    timeout: Duration,
) -> (KillOnDrop, Vec<(Instant, String)>) {
    try_spawn_until_stamped(cmd, ready, timeout).unwrap_or_else(|e| panic!("{e}"))
}

fn unstamped(lines: Vec<(Instant, String)>) -> Vec<String> {
    lines.into_iter().map(|(_, l)| l).collect()
}

/// [`spawn_until_stamped`], but a command that exits before it is ready is
/// an `Err` naming the command, what it printed and its stderr. Not being
/// ready within `timeout` still panics.
pub fn try_spawn_until_stamped(
    mut cmd: Command,
    ready: &str,
    timeout: Duration,
) -> Result<(KillOnDrop, Vec<(Instant, String)>), String> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let args: Vec<_> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading after the caller stopped listening: a closed pipe
        // would make ferry's next line fail.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((at, line)) => {
                let live = line.starts_with(ready);
                lines.push((at, line));
                if live {
                    return Ok((KillOnDrop::new(child), lines));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "ferry {args:?} exited before '{ready}': {:?} {err}",
                    unstamped(lines)
                ));
            }
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!(
                "ferry {args:?} did not print '{ready}' within {timeout:?}: {:?}",
                unstamped(lines)
            );
        }
    }
}

/// A child process that is killed if the test panics before it is done
/// with it, so a failing test leaves no ferry (and so no QEMU) behind.
pub struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    /// Guards `child`.
    pub fn new(child: std::process::Child) -> Self {
        Self(Some(child))
    }

    /// Takes the child back, unguarded.
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("present until dropped")
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("present until dropped")
    }
}

/// How long a guarded child gets to end after SIGTERM before SIGKILL: a
/// ferry whose guest agent hangs takes about 10 s to stop its VM (the
/// agent's 5 s, then the engine's power button).
const TERM_GRACE: Duration = Duration::from_secs(20);

impl Drop for KillOnDrop {
    /// SIGTERM first, so that a foreground `ferry boot` or `ferry peer`
    /// stops its VM and removes its network namespace (a SIGKILL leaves
    /// both behind for the next test to trip over); SIGKILL after
    /// [`TERM_GRACE`].
    fn drop(&mut self) {
        let Some(child) = self.0.as_mut() else { return };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped
            // (try_wait said it is running), so it cannot be reused yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
