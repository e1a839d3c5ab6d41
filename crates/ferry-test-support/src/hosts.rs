//! Network namespaces that stand in for separate machines.
//!
//! Networking and migration tests need several "hosts" that reach each other
//! over a network, and none of them may be the machine the tests run on:
//! tests check that ferry adds nothing to the root namespace. So each host
//! is a network namespace with `lo` and one interface, `eth0`, and all the
//! `eth0`s are plugged into a Linux bridge that lives in a namespace of its
//! own, the "switch":
//!
//! ```text
//!   fth3-a            fth3-b            fth3-c          (hosts)
//!   eth0 10.250.3.10  eth0 10.250.3.11  eth0 10.250.3.12
//!    |                 |                 |              (veth pairs)
//!   p-a ------------- p-b ------------- p-c  br0        fth3_switch
//! ```
//!
//! `k` (3 above) is the run's slot, 0 to 255: it names the namespaces and
//! picks the subnet `10.250.k.0/24`. A [`TestHosts`] holds an exclusive
//! `flock` on `/run/ferry-test-hosts/k.lock` from before it creates anything
//! until after it removed everything, so concurrent runs (other test
//! threads, other test binaries, other checkouts) never share a slot, and a
//! slot whose lock is free has no owner: any namespace still named after it
//! is a leftover of a crashed run, and [`remove_leftovers`] deletes it. The
//! kernel drops the lock when its process dies, however it dies.
//!
//! Everything is done by shelling out to `ip` (iproute2); this is test
//! support, and `ip` is what a person would type to look at the result.
//! Every function panics with a clear message instead of returning errors.
//!
//! # Caveats
//!
//! * [`Host::cmd`] uses `ip netns exec`, which gives the program a private
//!   (slave) mount namespace with `/sys` remounted for the host. Mounts the
//!   program makes are invisible to other processes; ferry makes its named
//!   namespaces from PID 1's mount namespace for this reason.
//! * The hosts share one file system, `/run/netns` included: the names of
//!   ferry's VM namespaces are machine-wide, not per host. [`Host::ferry`]
//!   sets `FERRY_NET_PREFIX` to the host's namespace name, so that a VM of
//!   the same name on two hosts gets two namespaces (`fth3-a-<vm>`,
//!   `fth3-b-<vm>`), and dropping the hosts removes what ferry left behind.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::FerryEnv;

/// Every namespace of a run is named `fth<k>-<host>` or `fth<k>_switch`.
const PREFIX: &str = "fth";
/// Where the slot locks live (machine-wide, whatever `$TMPDIR` says).
const LOCK_DIR: &str = "/run/ferry-test-hosts";
/// The interface each host has.
const INTERFACE: &str = "eth0";
/// The bridge in the switch namespace.
const BRIDGE: &str = "br0";
/// Host names: short enough for the switch port `p-<name>` (≤ 15 bytes).
const MAX_NAME: usize = 12;
/// The first host's last address byte.
const FIRST_HOST: u8 = 10;

/// Hosts joined by one switch; dropping it removes them all.
///
/// # Examples
///
/// ```no_run
/// let hosts = ferry_test_support::TestHosts::create(&["a", "b"]);
/// let (a, b) = (&hosts["a"], &hosts["b"]);
/// let ok = a
///     .cmd("busybox")
///     .args(["ping", "-c1", "-W2", &b.addr().to_string()])
///     .status()
///     .unwrap();
/// assert!(ok.success());
/// ```
pub struct TestHosts {
    slot: u8,
    hosts: Vec<Host>,
    /// Every namespace made so far, switch first; removed in reverse.
    created: Vec<String>,
    /// The slot's lock, held until `drop` has removed everything.
    lock: Option<File>,
}

/// One host: a network namespace with `lo` and `eth0`.
#[derive(Debug)]
pub struct Host {
    label: String,
    netns: String,
    addr: Ipv4Addr,
}

impl TestHosts {
    /// Creates one host per name, all on one switch, after removing the
    /// leftovers of crashed runs.
    ///
    /// Names are 1 to 12 characters from `a-z`, `0-9` and `-` (not first),
    /// all different. The hosts get `10.250.k.10`, `.11`, ... in the order
    /// given, `lo` and `eth0` up, and `net.ipv4.ip_forward=1`.
    ///
    /// # Panics
    ///
    /// If not root, if `ip` or `sysctl` is missing, if a name is invalid,
    /// if all 256 slots are in use, or if a step fails (with the command and
    /// its error). Whatever was made before the failure is removed.
    pub fn create(names: &[&str]) -> TestHosts {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "TestHosts needs root to create network namespaces: run the tests as root"
        );
        validate_names(names);
        remove_leftovers();
        let (slot, lock) = claim_slot();
        let mut hosts = TestHosts {
            slot,
            hosts: Vec::new(),
            created: Vec::new(),
            lock: Some(lock),
        };
        // Leftovers of a crashed run in this slot (remove_leftovers may have
        // lost the race for its lock to us).
        for ns in namespaces_of_slot(slot) {
            remove_namespace(&ns, "a leftover of a crashed run");
        }

        let switch = switch_name(slot);
        hosts.add_namespace(&switch);
        ip(&["-n", &switch, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", BRIDGE, "up"]);

        for (i, label) in names.iter().enumerate() {
            let netns = format!("{PREFIX}{slot}-{label}");
            let port = format!("p-{label}");
            let addr = Ipv4Addr::new(10, 250, slot, FIRST_HOST + i as u8);
            hosts.add_namespace(&netns);
            // Both ends are made where they belong: nothing ever appears in
            // the root namespace, not even for a moment.
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", INTERFACE,
                "netns", &netns,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", BRIDGE, "up"]);
            ip(&["-n", &netns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                INTERFACE,
            ]);
            ip(&["-n", &netns, "link", "set", INTERFACE, "up"]);
            let host = Host {
                label: label.to_string(),
                netns,
                addr,
            };
            let out = host
                .cmd("sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"])
                .output()
                .unwrap_or_else(|e| panic!("running sysctl (apt-get install procps): {e}"));
            assert!(
                out.status.success(),
                "enabling ip_forward in {}: {}",
                host.netns,
                crate::describe(&out)
            );
            hosts.hosts.push(host);
        }
        hosts
    }

    /// The host named `name` (as given to [`TestHosts::create`]), if any.
    pub fn get(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.label == name)
    }

    /// All hosts, in the order they were named.
    pub fn iter(&self) -> std::slice::Iter<'_, Host> {
        self.hosts.iter()
    }

    /// The hosts' subnet, `10.250.k.0` with prefix length 24.
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 250, self.slot, 0), 24)
    }

    /// The namespace that holds the bridge.
    pub fn switch_netns(&self) -> String {
        switch_name(self.slot)
    }

    fn add_namespace(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.created.push(ns.to_string());
    }
}

impl std::ops::Index<&str> for TestHosts {
    type Output = Host;

    /// The host named `name`; panics if there is none.
    fn index(&self, name: &str) -> &Host {
        self.get(name).unwrap_or_else(|| {
            let known: Vec<&str> = self.hosts.iter().map(|h| h.label.as_str()).collect();
            panic!("no test host named '{name}' (hosts: {known:?})")
        })
    }
}

impl<'a> IntoIterator for &'a TestHosts {
    type Item = &'a Host;
    type IntoIter = std::slice::Iter<'a, Host>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Drop for TestHosts {
    /// Kills what still runs inside the hosts, then removes every namespace
    /// (which removes their links), then any other namespace named after the
    /// slot (a VM namespace ferry left, see [`Host::ferry`]), then frees the
    /// slot. Runs when a test panics too; it reports problems on stderr
    /// instead of panicking.
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            remove_namespace(ns, "still running when the test hosts were dropped");
        }
        for ns in namespaces_of_slot(self.slot) {
            eprintln!("TestHosts: removing network namespace {ns}, left in a test host");
            remove_namespace(&ns, "left in a test host");
        }
        let left = namespaces_of_slot(self.slot);
        if !left.is_empty() {
            eprintln!("TestHosts: could not remove network namespaces {left:?}");
        }
        // Dropping the file releases the lock, only now that all is gone.
        self.lock.take();
    }
}

impl Host {
    /// The network namespace's name (`fth<k>-<name>`), for `ip -n` or
    /// `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.netns
    }

    /// The name given to [`TestHosts::create`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The address of its [`interface`](Host::interface), on the
    /// [`subnet`](TestHosts::subnet) of all hosts.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Its one interface, `eth0` (what ferry's `--host-interface` names).
    pub fn interface(&self) -> &str {
        INTERFACE
    }

    /// A command that runs `program` inside this host, with
    /// `ip netns exec NAME program`. The environment is passed on, and
    /// `/sys` shows this host's interfaces. Add arguments as usual.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// A [`FerryEnv`] for this host: its own state directory (named after
    /// the host, under the temporary directory), the shared cache.
    pub fn ferry_env(&self, ferry: impl Into<PathBuf>) -> FerryEnv {
        FerryEnv {
            ferry: ferry.into(),
            state: tempfile::Builder::new()
                .prefix(&format!("ferry-state-{}-", self.label))
                .tempdir()
                .expect("temp state dir"),
        }
    }

    /// `env`'s `ferry` command ([`FerryEnv::cmd`], with its environment),
    /// run inside this host, with `FERRY_NET_PREFIX` set to the host's
    /// [`name`](Host::name): VM `v` gets the namespace `<name>-v`. Add
    /// arguments as usual.
    pub fn ferry(&self, env: &FerryEnv) -> Command {
        let inner = env.cmd();
        let mut c = self.cmd(inner.get_program());
        c.args(inner.get_args());
        c.env("FERRY_NET_PREFIX", &self.netns);
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

/// Removes the namespaces of crashed runs: those of every slot whose lock
/// is free (no live [`TestHosts`] owns it), with whatever still runs in
/// them. Best effort; [`TestHosts::create`] calls it first.
pub fn remove_leftovers() {
    let mut slots: BTreeMap<u8, Vec<String>> = BTreeMap::new();
    for ns in netns_list() {
        if let Some(slot) = slot_of(&ns) {
            slots.entry(slot).or_default().push(ns);
        }
    }
    for (slot, names) in slots {
        let Some(lock) = try_lock_slot(slot) else {
            continue; // a live run owns it
        };
        for ns in names {
            remove_namespace(&ns, "a leftover of a crashed run");
        }
        drop(lock);
    }
}

fn validate_names(names: &[&str]) {
    assert!(
        !names.is_empty(),
        "TestHosts::create needs at least one host name"
    );
    assert!(
        names.len() <= usize::from(255 - FIRST_HOST),
        "at most {} test hosts",
        255 - FIRST_HOST
    );
    let mut seen = HashSet::new();
    for n in names {
        let ok = !n.is_empty()
            && n.len() <= MAX_NAME
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !n.starts_with('-');
        assert!(
            ok,
            "test host name '{n}': use 1 to {MAX_NAME} characters from a-z, 0-9 and '-' (not first)"
        );
        assert!(seen.insert(n), "test host name '{n}' is given twice");
    }
}

fn switch_name(slot: u8) -> String {
    format!("{PREFIX}{slot}_switch")
}

/// The slot of a namespace named by this module, if it is one.
fn slot_of(ns: &str) -> Option<u8> {
    let rest = ns.strip_prefix(PREFIX)?;
    let end = rest.find(['-', '_'])?;
    let digits = &rest[..end];
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if &rest[end..] != "_switch" && !rest[end..].starts_with('-') {
        return None;
    }
    digits.parse().ok()
}

fn namespaces_of_slot(slot: u8) -> Vec<String> {
    netns_list()
        .into_iter()
        .filter(|ns| slot_of(ns) == Some(slot))
        .collect()
}

/// Takes the first free slot.
fn claim_slot() -> (u8, File) {
    for slot in 0..=255u8 {
        if let Some(mut lock) = try_lock_slot(slot) {
            // For a person wondering who holds it.
            let _ = lock.set_len(0);
            let _ = writeln!(lock, "pid {}", std::process::id());
            return (slot, lock);
        }
    }
    panic!("all 256 test-host slots ({LOCK_DIR}/*.lock) are taken: too many concurrent TestHosts?")
}

/// The slot's lock if no one holds it.
fn try_lock_slot(slot: u8) -> Option<File> {
    std::fs::create_dir_all(LOCK_DIR).unwrap_or_else(|e| panic!("creating {LOCK_DIR}: {e}"));
    let path = Path::new(LOCK_DIR).join(format!("{slot}.lock"));
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: flock on a descriptor owned by `f`, which lives as long as
    // the lock is wanted.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(f)
}

/// `ip ARGS`, or a panic naming the command and its error.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("running 'ip' failed ({e}): install iproute2 (scripts/setup.sh)")
    });
    assert!(
        out.status.success(),
        "'ip {}' failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The names `ip netns list` shows.
fn netns_list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap_or_else(|e| panic!("running 'ip netns list' failed ({e}): install iproute2"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Kills the processes inside network namespace `ns` (saying so, with
/// `why`), then deletes it. Best effort: problems go to stderr.
fn remove_namespace(ns: &str, why: &str) {
    let path = Path::new("/run/netns").join(ns);
    if let Ok(meta) = std::fs::metadata(&path) {
        let id = (meta.dev(), meta.ino());
        let members = processes_in(id);
        if !members.is_empty() {
            let list: Vec<String> = members.iter().map(|p| describe_pid(*p)).collect();
            eprintln!(
                "TestHosts: killing processes in {ns} ({why}): {}",
                list.join(", ")
            );
            for pid in &members {
                crate::send_signal(*pid, libc::SIGKILL);
            }
            let start = Instant::now();
            while !processes_in(id).is_empty() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let out = Command::new("ip").args(["netns", "del", ns]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "TestHosts: 'ip netns del {ns}' failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("TestHosts: running 'ip netns del {ns}' failed: {e}"),
    }
}

/// Live processes whose network namespace is `id` (device and inode of its
/// nsfs file). Never this process: it never enters a host.
fn processes_in(id: (u64, u64)) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid != 1)
        .filter(|pid| {
            // Fails for zombies and vanished processes: not members.
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == id)
        })
        .collect()
}

fn describe_pid(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    format!("{pid} ({})", cmd.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_read_from_our_names_only() {
        assert_eq!(slot_of("fth3-a"), Some(3));
        assert_eq!(slot_of("fth255-web-1"), Some(255));
        assert_eq!(slot_of("fth17_switch"), Some(17));
        assert_eq!(slot_of("fth256-a"), None);
        assert_eq!(slot_of("fth-a"), None);
        assert_eq!(slot_of("fth3_other"), None);
        assert_eq!(slot_of("fthx-a"), None);
        assert_eq!(slot_of("ferry-vm"), None);
        assert_eq!(slot_of("fth1234-a"), None);
    }

    #[test]
    #[should_panic(expected = "is given twice")]
    fn duplicate_names_are_refused() {
        validate_names(&["a", "a"]);
    }

    #[test]
    #[should_panic(expected = "use 1 to 12 characters")]
    fn long_names_are_refused() {
        validate_names(&["a-very-long-name"]);
    }
}
