//! Many VMs on one host, managed like containers: `ferry up` starts N
//! copy-on-write clones of a package as a fleet of detached VMs (see
//! [`crate::detach`]), and `ps`, `stop`, `start`, `restart`, `rm`, `clean`
//! and `logs` work on every VM of the state directory, detached or not.
//!
//! What a VM is doing comes from two places: its directory's lock (held
//! while a supervisor runs it) and its record (`vm.json`, what it was last
//! doing). `running` = locked; `suspended` / `stopped` = unlocked with a
//! record that says so; `crashed` = unlocked otherwise (the guest died, or
//! its supervisor did).
//!
//! - this module: `ferry up`, `run --detach` and the fleet's membership;
//! - [`ps`]: what each VM is doing (`ferry ps`), and how much memory it has
//!   of its own;
//! - [`manage`]: `stop`, `start`, `restart`, `rm`, `clean`, `logs`.

mod change;
mod manage;
mod ps;

pub use change::VmChange;
pub use manage::*;
pub use ps::*;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_agent_proto::{FleetMember, Liveness};
use ferry_engine::AccelChoice;
use ferry_net::ExposeSpec;
use ferry_package::{Package, SectionKind, TrustedKeys};

use crate::cache::SectionCache;
use crate::detach::{launch, DetachSpec, Launch, StartFrom, Started};
use crate::error::{FileError, FleetError, NameError, StartError};
use crate::events::{Event, EventSink};
use crate::package_meta::read as read_meta;
use crate::record::{FleetSpec, NetSpec, RecordState, VmRecord};
use crate::vmdir::{running_vm_dir, validate_name};
use crate::{Cancel, Paths};

use manage::{remove_state, stop_all, unknown};

/// What `ferry up` assumes QEMU itself may use per VM, beyond guest
/// memory (its own heap, TCG's translation cache, device buffers).
pub const ENGINE_OVERHEAD_MIB: u64 = 64;
/// Memory `ferry up` leaves to the host.
pub const HOST_RESERVE_MIB: u64 = 512;

/// How long a starting command waits for a supervisor's report.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of `ferry up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The package to clone.
    pub package: PathBuf,
    /// How many clones.
    pub count: u64,
    /// Their names are `<prefix>-0 … <prefix>-(N-1)`; the recipe's name if
    /// `None`. Also the fleet's name.
    pub name_prefix: Option<String>,
    /// Clone i's service is exposed on port `base + i`; ports the kernel
    /// picks if `None`.
    pub expose_base: Option<u16>,
    /// The guest port to expose; the package's TCP liveness port if `None`.
    pub guest_port: Option<u16>,
    /// The host address exposures listen on.
    pub host: IpAddr,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// How long each clone may take to be live.
    pub live_timeout: Duration,
    /// The `ferry` binary, which supervisors run.
    pub ferry: PathBuf,
    /// Keys one of which must have signed the package (`--trust`).
    pub trust: TrustedKeys,
}

/// `ferry up`: starts `count` copy-on-write clones of a package, each a
/// detached VM in its own namespace with its service exposed, all members
/// of one fleet; returns once all are live. Refuses before starting
/// anything if a name is taken, a port is in use or the clones do not fit
/// in memory. If any clone fails, the others are discarded, so that an
/// `up` either starts the whole fleet or leaves nothing behind.
pub fn up(
    paths: &Paths,
    opts: &UpOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Vec<Started>, FleetError> {
    let say = |message: String| events.emit(Event::Notice { message });
    let t0 = Instant::now();
    if opts.count == 0 {
        return Err(FleetError::BadOption(
            "-n 0 starts nothing: give a number of clones of 1 or more".into(),
        ));
    }
    let pkg = Package::open(&opts.package)?;
    opts.trust.check(pkg.index())?;
    let package = std::fs::canonicalize(&opts.package).map_err(FileError::at(&opts.package))?;
    let meta = read_meta(&pkg)?;
    let prefix = opts
        .name_prefix
        .clone()
        .unwrap_or_else(|| meta.recipe.clone());
    let names: Vec<String> = (0..opts.count).map(|i| format!("{prefix}-{i}")).collect();
    for n in &names {
        validate_name(n).map_err(|_| {
            FleetError::BadOption(format!(
                "--name-prefix '{prefix}' makes the VM name '{n}', which is not valid: use a-z, 0-9, '-', '_' and '.', starting with a letter or digit, 61 characters at most"
            ))
        })?;
    }
    let guest_port = match (opts.guest_port, &meta.liveness) {
        (Some(p), _) => p,
        (None, Liveness::Tcp { port }) => *port,
        (None, _) => {
            return Err(FleetError::BadOption(format!(
                "{} has no TCP liveness port to expose: pass --guest-port PORT",
                package.display()
            )))
        }
    };
    check_names_free(paths, &names)?;
    check_fits(opts.count, meta.provenance.memory_mib)?;
    let ports = host_ports(opts.host, opts.expose_base, &names)?;

    // Every chunk checked once here, and every section extracted into the
    // cache once, rather than by N supervisors at the same time.
    say(format!(
        "checking {} and preparing {} clone{}",
        package.display(),
        opts.count,
        if opts.count == 1 { "" } else { "s" }
    ));
    pkg.verify(&mut |_, _| {})?;
    let cache = SectionCache::new(&paths.cache);
    for kind in SectionKind::ALL {
        if kind != SectionKind::DeviceState && kind != SectionKind::Config {
            cache.get(&pkg, kind)?;
        }
    }
    drop(pkg);

    let fleet = FleetSpec {
        name: prefix.clone(),
        guest_port,
    };
    let specs: Vec<DetachSpec> = names
        .iter()
        .zip(&ports)
        .map(|(name, port)| DetachSpec {
            name: name.clone(),
            from: StartFrom::Clone {
                package: package.clone(),
                verified: true,
                // Checked again by each supervisor, on the file it opens.
                trust: opts.trust.clone(),
            },
            accel: opts.accel,
            net: NetSpec {
                none: false,
                netns: None,
                exposes: vec![ExposeSpec {
                    host: opts.host,
                    host_port: *port,
                    guest_port,
                }],
            },
            fleet: Some(fleet.clone()),
            live_timeout_s: opts.live_timeout.as_secs(),
        })
        .collect();
    say(format!(
        "starting {} ({} MiB guest memory each, guest port {guest_port} exposed on {})",
        span(&names),
        meta.provenance.memory_mib,
        port_span(opts.host, &ports)
    ));
    let results = start_all(paths, &opts.ferry, specs, events, cancel);
    // A supervisor killed mid-start (it did not stop when asked) leaves a
    // crashed directory and namespace: not part of what `up` leaves.
    for (name, r) in names.iter().zip(&results) {
        if r.is_err() && matches!(state_of(paths, name), Some((RecordState::Crashed, _))) {
            let _ = remove_state(paths, name);
        }
    }
    let (started, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    let started: Vec<Started> = started.into_iter().map(|r| r.expect("ok")).collect();
    if failed.is_empty() {
        say(format!(
            "fleet '{prefix}': {} VM{} running after {} ms; 'ferry ps' lists them, 'ferry stop --all' suspends them",
            started.len(),
            if started.len() == 1 { "" } else { "s" },
            t0.elapsed().as_millis()
        ));
        return Ok(started);
    }
    let errors: Vec<FleetError> = failed.into_iter().map(|r| r.expect_err("err")).collect();
    if !started.is_empty() {
        say(format!(
            "{} of {} clones failed: discarding the {} that started, so that no half fleet is left running",
            errors.len(),
            names.len(),
            started.len()
        ));
        for line in stop_all(
            paths,
            started.iter().map(|s| s.name.clone()).collect(),
            true,
        ) {
            match line {
                Ok(c) => events.emit(Event::VmChanged(c)),
                Err(e) => say(format!("could not discard: {e}")),
            }
        }
    }
    let code = errors.first().map(|e| e.exit_class().code()).unwrap_or(1);
    Err(FleetError::Several {
        summary: format!(
            "{} of {} clones did not start and nothing of fleet '{prefix}' is left running",
            errors.len(),
            names.len()
        ),
        failures: errors.iter().map(ToString::to_string).collect(),
        code,
    })
}

/// Launches every spec's supervisor and waits for all, reporting each
/// one's outcome as it comes. A cancel stops the ones still starting;
/// their results are then errors.
fn start_all(
    paths: &Paths,
    ferry: &Path,
    specs: Vec<DetachSpec>,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Vec<Result<Started, FleetError>> {
    let mut launches: Vec<Result<Launch, (String, FleetError)>> = Vec::new();
    for spec in &specs {
        launches.push(launch(ferry, paths, spec).map_err(|e| (spec.name.clone(), e.into())));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut results: Vec<Option<Result<Started, FleetError>>> =
        (0..specs.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        for (i, l) in launches.into_iter().enumerate() {
            let tx = tx.clone();
            scope.spawn(move || {
                let result = match l {
                    Ok(l) => l
                        .wait(READY_TIMEOUT, cancel, None)
                        .map_err(FleetError::from),
                    Err((_, e)) => Err(e),
                };
                let _ = tx.send((i, result));
            });
        }
        drop(tx);
        for (i, result) in rx {
            match &result {
                Ok(s) => events.emit(Event::Started(s.clone())),
                Err(FleetError::Start(StartError::DetachedStart { name, message, .. })) => events
                    .emit(Event::StartFailed {
                        name: name.clone(),
                        message: message.clone(),
                    }),
                Err(e) => events.emit(Event::StartFailed {
                    name: specs[i].name.clone(),
                    message: e.to_string(),
                }),
            }
            results[i] = Some(result);
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every start reports"))
        .collect()
}

/// `web-0: live in 812 ms (pid 1234, 127.0.0.1:18100 -> 8000)`.
pub(super) struct StartedLine<'a>(&'a Started);

impl std::fmt::Display for StartedLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        write!(f, "{}: live in {} ms (pid {}", s.name, s.ms, s.pid)?;
        for e in &s.exposes {
            write!(f, ", {} -> {}", e.host_addr(), e.guest_port)?;
        }
        write!(f, ")")
    }
}

/// `web-0 … web-2`.
fn span(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [first, .., last] => format!("{first} … {last}"),
    }
}

fn port_span(host: IpAddr, ports: &[u16]) -> String {
    let consecutive = ports.windows(2).all(|w| w[1] == w[0] + 1);
    match ports {
        [one] => SocketAddr::new(host, *one).to_string(),
        [first, .., last] if consecutive => format!("{host}:{first}-{last}"),
        _ => format!(
            "{host}:{}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// Fails, naming every taken name, if any of `names` is in use by a running
/// VM or kept by a suspended or stopped one.
fn check_names_free(paths: &Paths, names: &[String]) -> Result<(), FleetError> {
    let taken: Vec<String> = names
        .iter()
        .filter_map(|n| match state_of(paths, n) {
            Some((RecordState::Running, _)) => Some(format!("'{n}' (running)")),
            Some((_, _)) => {
                crate::vmdir::held_state(&paths.vms().join(n)).map(|s| format!("'{n}' ({s})"))
            }
            None => None,
        })
        .collect();
    if taken.is_empty() {
        return Ok(());
    }
    Err(FleetError::BadOption(format!(
        "the name{} {} {} taken: choose another --name-prefix, or 'ferry stop --discard' / 'ferry rm' {}",
        if taken.len() == 1 { "" } else { "s" },
        taken.join(", "),
        if taken.len() == 1 { "is" } else { "are" },
        if taken.len() == 1 { "it" } else { "them" },
    )))
}

/// How many clones of a `guest_mib` guest fit in `available_mib`, each
/// counted at its worst: all of its guest memory written (the host has no
/// swap to fall back on) plus the engine's own.
pub fn clones_that_fit(guest_mib: u64, available_mib: u64) -> u64 {
    available_mib.saturating_sub(HOST_RESERVE_MIB) / (guest_mib + ENGINE_OVERHEAD_MIB)
}

fn check_fits(count: u64, guest_mib: u64) -> Result<(), FleetError> {
    let Some(available_mib) = meminfo("MemAvailable:") else {
        return Ok(());
    };
    let fit = clones_that_fit(guest_mib, available_mib);
    if count <= fit {
        return Ok(());
    }
    Err(FleetError::TooManyClones {
        asked: count,
        fit,
        guest_mib,
        per_clone_mib: guest_mib + ENGINE_OVERHEAD_MIB,
        available_mib,
        reserve_mib: HOST_RESERVE_MIB,
    })
}

/// A `/proc/meminfo` field, in MiB.
fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// The host ports of the clones: `base + i`, each checked free, or ports
/// the kernel picks.
fn host_ports(host: IpAddr, base: Option<u16>, names: &[String]) -> Result<Vec<u16>, FleetError> {
    let bind = |port: u16| TcpListener::bind(SocketAddr::new(host, port));
    match base {
        Some(base) => {
            let last = base as u64 + names.len() as u64 - 1;
            if base == 0 || last > u16::MAX as u64 {
                return Err(FleetError::BadOption(format!(
                    "--expose-base {base} with -n {} needs ports {base}-{last}: use a base from 1 to {}",
                    names.len(),
                    (u16::MAX as u64 + 1).saturating_sub(names.len() as u64)
                )));
            }
            let ports: Vec<u16> = (0..names.len()).map(|i| base + i as u16).collect();
            for (port, name) in ports.iter().zip(names) {
                bind(*port).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AddrInUse => FleetError::BadOption(format!(
                        "port {host}:{port} (for {name}) is in use: choose another --expose-base"
                    )),
                    _ => FleetError::BadOption(format!("cannot listen on {host}:{port}: {e}")),
                })?;
            }
            Ok(ports)
        }
        None => {
            // Held together, so that the kernel hands out distinct ports.
            let listeners = names
                .iter()
                .map(|_| bind(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| FleetError::BadOption(format!("cannot listen on {host}: {e}")))?;
            Ok(listeners
                .iter()
                .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
                .collect())
        }
    }
}

/// The running members of `fleet` in this state directory, each at
/// `gateway:HOSTPORT` (the host port its fleet port is exposed on), sorted
/// by name. What every member's guest is told.
pub fn fleet_members(paths: &Paths, fleet: &FleetSpec, gateway: &str) -> Vec<FleetMember> {
    let mut members: Vec<FleetMember> = std::fs::read_dir(paths.vms())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let record = VmRecord::load(&e.path())?;
            if record.fleet.as_ref().map(|f| &f.name) != Some(&fleet.name) {
                return None;
            }
            let port = record
                .net
                .exposes
                .iter()
                .find(|x| x.guest_port == fleet.guest_port)?
                .host_port;
            running_vm_dir(paths, &name).ok()?;
            Some(FleetMember {
                name,
                addr: format!("{gateway}:{port}"),
            })
        })
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members
}

/// Options of `ferry run --detach`.
#[derive(Debug, Clone)]
pub struct RunDetachedOptions {
    /// The package.
    pub package: PathBuf,
    /// The VM's name.
    pub name: String,
    /// A copy-on-write clone rather than the package itself.
    pub clone: bool,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Its network.
    pub net: NetSpec,
    /// How long it may take to be live.
    pub live_timeout: Duration,
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// Keys one of which must have signed the package (`--trust`).
    pub trust: TrustedKeys,
}

/// `ferry run --detach`: starts the package (or a clone of it) as a
/// detached VM and returns once it is live.
pub fn run_detached(
    paths: &Paths,
    opts: &RunDetachedOptions,
    events: &dyn EventSink,
    cancel: &Cancel,
) -> Result<Started, FleetError> {
    validate_name(&opts.name)?;
    let pkg = Package::open(&opts.package)?;
    // Refused here, before a supervisor starts (which checks again).
    opts.trust.check(pkg.index())?;
    read_meta(&pkg)?;
    drop(pkg);
    let package = std::fs::canonicalize(&opts.package).map_err(FileError::at(&opts.package))?;
    check_names_free(paths, std::slice::from_ref(&opts.name)).map_err(|_| {
        match state_of(paths, &opts.name) {
            Some((RecordState::Running, _)) => NameError::NameInUse {
                name: opts.name.clone(),
                pid: String::new(),
            }
            .into(),
            Some((state, _)) => NameError::NameHeld {
                name: opts.name.clone(),
                state,
            }
            .into(),
            None => unknown(paths, &opts.name),
        }
    })?;
    let spec = DetachSpec {
        name: opts.name.clone(),
        from: if opts.clone {
            StartFrom::Clone {
                package,
                verified: false,
                trust: opts.trust.clone(),
            }
        } else {
            StartFrom::Package {
                package,
                trust: opts.trust.clone(),
            }
        },
        accel: opts.accel,
        net: opts.net.clone(),
        fleet: None,
        live_timeout_s: opts.live_timeout.as_secs(),
    };
    let started = launch(&opts.ferry, paths, &spec)?.wait(READY_TIMEOUT, cancel, Some(events))?;
    events.emit(Event::Started(started.clone()));
    Ok(started)
}

#[cfg(test)]
mod tests {
    use super::ps::private_kib;
    use super::*;
    use crate::vmdir::{files, VmDir};
    use ferry_engine::Accel;

    #[test]
    fn clones_that_fit_count_each_at_its_worst() {
        assert_eq!(clones_that_fit(256, 24_000), (24_000 - 512) / 320);
        assert_eq!(clones_that_fit(256, 400), 0);
        assert_eq!(clones_that_fit(1024, 512 + 1088 * 3), 3);
    }

    #[test]
    fn unique_memory_is_the_private_part_of_smaps_rollup() {
        let text = "00400000-7ffd0000 ---p 00000000 00:00 0 [rollup]\n\
Rss:              300000 kB\n\
Pss:              120000 kB\n\
Shared_Clean:     200000 kB\n\
Shared_Dirty:          0 kB\n\
Private_Clean:      4096 kB\n\
Private_Dirty:     20480 kB\n\
Referenced:       300000 kB\n\
Private_Hugetlb:       0 kB\n";
        assert_eq!(private_kib(text), 24576);
    }

    #[test]
    fn spans_read_well() {
        let names: Vec<String> = (0..3).map(|i| format!("web-{i}")).collect();
        assert_eq!(span(&names), "web-0 … web-2");
        assert_eq!(span(&names[..1]), "web-0");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            port_span(lo, &[18100, 18101, 18102]),
            "127.0.0.1:18100-18102"
        );
        assert_eq!(port_span(lo, &[5, 9]), "127.0.0.1:5,9");
        assert_eq!(port_span(lo, &[5]), "127.0.0.1:5");
    }

    fn paths(dir: &Path) -> Paths {
        Paths {
            state: dir.to_path_buf(),
            cache: dir.join("cache"),
            net_prefix: "ferry".into(),
        }
    }

    fn record(name: &str, state: RecordState, port: u16) -> VmRecord {
        VmRecord {
            name: name.into(),
            state,
            package: "/p/web.ferry".into(),
            clone: true,
            saved: None,
            fleet: Some(FleetSpec {
                name: "web".into(),
                guest_port: 8000,
            }),
            net: NetSpec {
                none: false,
                netns: None,
                exposes: vec![ExposeSpec {
                    host: "127.0.0.1".parse().unwrap(),
                    host_port: port,
                    guest_port: 8000,
                }],
            },
            accel: Accel::Tcg,
            memory_mib: 256,
            supervisor_pid: 1,
            started_unix: 0,
            note: None,
        }
    }

    #[test]
    fn states_come_from_the_lock_and_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        let p = paths(tmp.path());
        assert_eq!(state_of(&p, "web-0"), None);
        // Running: locked.
        let running = VmDir::create(&p, "web-0").unwrap();
        record("web-0", RecordState::Running, 18100)
            .save(running.path())
            .unwrap();
        assert_eq!(state_of(&p, "web-0").unwrap().0, RecordState::Running);
        // Its supervisor dies: the record still says running.
        drop(running);
        assert_eq!(state_of(&p, "web-0").unwrap().0, RecordState::Crashed);
        // Suspended: the record says so, and the directory is kept.
        let dir = VmDir::resume(&p, "web-0").unwrap();
        record("web-0", RecordState::Suspended, 18100)
            .save(dir.path())
            .unwrap();
        std::fs::write(dir.path().join("memory"), b"x").unwrap();
        dir.remove();
        assert_eq!(state_of(&p, "web-0").unwrap().0, RecordState::Suspended);
        assert!(!tmp.path().join("vms/web-0/memory").exists());
        assert!(tmp.path().join("vms/web-0/vm.json").exists());
        // A suspended VM keeps its name.
        let e = VmDir::create(&p, "web-0").unwrap_err().to_string();
        assert!(e.contains("belongs to a suspended VM"), "{e}");
        let e = check_names_free(&p, &["web-0".into(), "web-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'web-0' (suspended) is taken"), "{e}");
        // rm deletes it.
        let removed = rm(&p, "web-0").unwrap();
        assert_eq!(removed.to_string(), "removed web-0 (suspended)");
        assert_eq!(
            removed,
            VmChange::Removed {
                name: "web-0".into(),
                was: RecordState::Suspended,
                kept: None
            }
        );
        assert!(!tmp.path().join("vms/web-0").exists());
        assert!(matches!(
            rm(&p, "web-0").unwrap_err(),
            FleetError::Name(NameError::UnknownVm { .. })
        ));
    }

    #[test]
    fn fleet_members_are_the_running_vms_of_the_fleet() {
        let tmp = tempfile::tempdir().unwrap();
        let p = paths(tmp.path());
        let fleet = FleetSpec {
            name: "web".into(),
            guest_port: 8000,
        };
        let a = VmDir::create(&p, "web-1").unwrap();
        record("web-1", RecordState::Running, 18101)
            .save(a.path())
            .unwrap();
        let b = VmDir::create(&p, "web-0").unwrap();
        record("web-0", RecordState::Running, 18100)
            .save(b.path())
            .unwrap();
        let other = VmDir::create(&p, "db-0").unwrap();
        let mut r = record("db-0", RecordState::Running, 18200);
        r.fleet.as_mut().unwrap().name = "db".into();
        r.save(other.path()).unwrap();
        let members = fleet_members(&p, &fleet, "172.100.100.1");
        assert_eq!(
            members,
            vec![
                FleetMember {
                    name: "web-0".into(),
                    addr: "172.100.100.1:18100".into()
                },
                FleetMember {
                    name: "web-1".into(),
                    addr: "172.100.100.1:18101".into()
                },
            ]
        );
        drop(a);
        assert_eq!(fleet_members(&p, &fleet, "172.100.100.1").len(), 1);
    }

    #[test]
    fn clean_removes_crashed_vms_and_keeps_suspended_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let p = paths(tmp.path());
        let crashed = VmDir::create(&p, "web-0").unwrap();
        record("web-0", RecordState::Running, 1)
            .save(crashed.path())
            .unwrap();
        drop(crashed);
        let suspended = VmDir::create(&p, "web-1").unwrap();
        record("web-1", RecordState::Suspended, 2)
            .save(suspended.path())
            .unwrap();
        suspended.remove();
        // Crashed after a start: it had saved state.
        let restarted = VmDir::create(&p, "web-2").unwrap();
        let mut r = record("web-2", RecordState::Running, 3);
        r.saved = Some(restarted.path().join(files::SAVED));
        r.save(restarted.path()).unwrap();
        std::fs::write(restarted.path().join(files::SAVED), b"pkg").unwrap();
        std::fs::write(restarted.path().join("memory"), b"x").unwrap();
        drop(restarted);
        let events = crate::events::Collect::default();
        let lines = clean(&p, &events).unwrap();
        assert!(!tmp.path().join("vms/web-0").exists(), "{lines:?}");
        assert_eq!(state_of(&p, "web-1").unwrap().0, RecordState::Suspended);
        assert_eq!(state_of(&p, "web-2").unwrap().0, RecordState::Suspended);
        assert!(tmp.path().join("vms/web-2/saved.ferry").exists());
        assert!(!tmp.path().join("vms/web-2/memory").exists());
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.contains(&VmChange::Resuspended {
            name: "web-2".into()
        }));
        assert_eq!(events.events().len(), 2, "one event per VM changed");
        let again = crate::events::Collect::default();
        assert!(clean(&p, &again).unwrap().is_empty());
        assert!(matches!(
            again.events().as_slice(),
            [Event::Notice { message }] if message == "nothing to clean"
        ));
    }
}
