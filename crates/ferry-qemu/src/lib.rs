//! ferry's first engine: QEMU's `microvm` machine, driven over QMP.
//!
//! Each VM is one `qemu-system-x86_64` process with: guest RAM in a file
//! (`memory-backend-file`, so a snapshot need not copy it), a virtio-blk disk,
//! a virtio-net device (always present, so snapshots are portable between
//! hosts whatever their networking), a virtio-serial port for the guest agent
//! and the serial console on the process's standard output. Everything
//! QEMU-specific stays in this crate; the rest of ferry sees
//! [`ferry_engine::Engine`].
#![warn(missing_docs)]

mod accel;
mod cgroup;
mod confine;
mod qmp;
mod version;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferry_engine::{
    Accel, AccelChoice, AccelDecision, BeforeRun, Engine, EngineError, ProbeGuest, Provenance,
    SavedState, Vm, VmSpec,
};

pub use accel::kvm_device_problem;
pub use cgroup::CgroupParent;
pub use confine::{
    Confine, QemuUser, CONFINE_ENV, MEMORY_OVERHEAD_ENV, MEMORY_OVERHEAD_MIB, PIDS_MAX, QEMU_USER,
    TCG_TB_SIZE_MIB,
};
pub use version::QemuVersion;
pub use vm::SANDBOX;

/// The QEMU program ferry uses unless `$FERRY_QEMU` names another.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// Names QEMU's data directories (firmware, option ROMs), `:`-separated,
/// for a QEMU that does not find its own, e.g. one unpacked with `dpkg -x`.
pub const DATADIR_ENV: &str = "FERRY_QEMU_DATADIR";

/// The `microvm` firmware ferry names when QEMU has it: qboot, upstream
/// QEMU's default for `microvm`.
///
/// The firmware is part of a saved state (QEMU migrates its ROM as the RAM
/// block `pc.bios`, and refuses a state whose block has another size), and
/// Debian changed its default between releases: 7.2 loads qboot (64 KiB),
/// 10 SeaBIOS's `microvm` build (128 KiB, from the seabios package). Naming
/// qboot keeps states loadable across the two; both ship it.
pub const MICROVM_BIOS: &str = "qboot.rom";

/// The QEMU engine.
pub struct QemuEngine {
    qemu: PathBuf,
    cache_dir: PathBuf,
    /// Passed to QEMU as `-L`, in order.
    data_dirs: Vec<PathBuf>,
    /// `qemu-img` beside the QEMU binary, or the one in `PATH`.
    qemu_img: PathBuf,
    /// [`MICROVM_BIOS`] if this QEMU finds it.
    bios: Option<&'static str>,
    /// `--version`'s number as printed, and parsed.
    version: OnceLock<(String, QemuVersion)>,
    /// How each QEMU is confined.
    confine: Confine,
}

impl QemuEngine {
    /// An engine using `qemu` (a path or a name looked up in `PATH`) that
    /// keeps its accelerator verdicts under `cache_dir`. Fails if QEMU is not
    /// installed.
    pub fn new(qemu: &str, cache_dir: &Path) -> Result<Self, EngineError> {
        let path = find_program(qemu).ok_or_else(|| EngineError::NotInstalled {
            program: qemu.to_string(),
            fix: "install it with 'apt-get install -y --no-install-recommends qemu-system-x86' (or point $FERRY_QEMU at it)".into(),
        })?;
        let data_dirs = match std::env::var_os(DATADIR_ENV) {
            Some(dirs) => std::env::split_paths(&dirs)
                .filter(|d| !d.as_os_str().is_empty())
                .collect(),
            None => data_dirs_beside(&path),
        };
        // The image tool of the same build, where there is one beside it.
        let qemu_img = path
            .parent()
            .map(|d| d.join("qemu-img"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("qemu-img"));
        let bios = has_firmware(&path, &data_dirs, MICROVM_BIOS).then_some(MICROVM_BIOS);
        Ok(Self {
            qemu: path,
            cache_dir: cache_dir.to_path_buf(),
            data_dirs,
            qemu_img,
            bios,
            version: OnceLock::new(),
            confine: Confine::from_env(),
        })
    }

    /// Path of the QEMU binary in use.
    pub fn program(&self) -> &Path {
        &self.qemu
    }

    /// The data directories QEMU is pointed at with `-L` (empty when it
    /// finds its own).
    pub fn data_dirs(&self) -> &[PathBuf] {
        &self.data_dirs
    }

    /// The QEMU version, read once.
    pub fn qemu_version(&self) -> Result<QemuVersion, EngineError> {
        self.read_version().map(|(_, v)| v)
    }

    fn read_version(&self) -> Result<(String, QemuVersion), EngineError> {
        if let Some(v) = self.version.get() {
            return Ok(v.clone());
        }
        // Remembered per binary (`memo`); only an answer that parses is kept.
        let mut failed = None;
        let text = ferry_engine::memo::text(&self.cache_dir, "qemu-version", &self.qemu, || {
            match Command::new(&self.qemu).arg("--version").output() {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if parse_version(&text).is_none() {
                        failed = Some(text);
                        return None;
                    }
                    Some(text)
                }
                Err(e) => {
                    failed = Some(format!("running it failed: {e}"));
                    None
                }
            }
        })
        .unwrap_or_else(|| failed.unwrap_or_default());
        let version = parse_version(&text).ok_or_else(|| {
            EngineError::StartFailed(format!(
                "unexpected QEMU version output from {}: {}",
                self.qemu.display(),
                text.trim()
            ))
        })?;
        Ok(self.version.get_or_init(|| version).clone())
    }

    /// The guest memory added on a cold boot, and says once why when
    /// there is some: it makes live copies slower (see
    /// [`vm::TCG_MEMORY_EXTRA_KIB`]).
    fn boot_memory_extra_kib(&self, accel: Accel) -> Result<u64, EngineError> {
        let version = self.qemu_version()?;
        let extra = vm::memory_extra_kib(accel, version);
        if extra > 0 {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    "QEMU {version} under TCG: the guest gets {extra} KiB more memory so that live \
                     migration keeps every write (QEMU before {} loses some); live copies are slower \
                     for it. QEMU 9.0 or later needs no workaround (docs/engine.md)",
                    version::TCG_DIRTY_SYNC_FIXED
                );
            });
        }
        Ok(extra)
    }
}

/// The version in `qemu-system-x86_64 --version`'s first line, as printed
/// and parsed.
fn parse_version(text: &str) -> Option<(String, QemuVersion)> {
    text.lines()
        .next()
        .and_then(|l| l.split("version ").nth(1))
        .map(|v| v.split_whitespace().next().unwrap_or(v).to_string())
        .and_then(|v| QemuVersion::parse(&v).map(|parsed| (v, parsed)))
}

/// QEMU's data directories beside a binary installed outside `/usr`
/// (`PREFIX/bin/qemu-system-x86_64` → `PREFIX/share/qemu`, and
/// `PREFIX/share/seabios`, where Debian's QEMU 10 finds the `microvm`
/// firmware). A QEMU in `/usr` finds its own; one unpacked elsewhere
/// would otherwise load the system QEMU's firmware.
fn data_dirs_beside(qemu: &Path) -> Vec<PathBuf> {
    let real = std::fs::canonicalize(qemu).unwrap_or_else(|_| qemu.to_path_buf());
    let Some(prefix) = real.parent().and_then(Path::parent) else {
        return Vec::new();
    };
    if prefix == Path::new("/usr") || prefix == Path::new("/") {
        return Vec::new();
    }
    ["share/qemu", "share/seabios"]
        .iter()
        .map(|d| prefix.join(d))
        .filter(|d| d.is_dir())
        .collect()
}

/// Whether QEMU finds firmware `name`: in the `-L` directories, beside its
/// binary (`../share/qemu`) or in `/usr/share/qemu`, where QEMU looks
/// (`qemu-system-x86_64 -L help` lists them; asking QEMU would cost a
/// process start on every resume).
fn has_firmware(qemu: &Path, data_dirs: &[PathBuf], name: &str) -> bool {
    let beside = qemu
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("share/qemu"));
    data_dirs
        .iter()
        .cloned()
        .chain(beside)
        .chain([PathBuf::from("/usr/share/qemu")])
        .any(|d| d.join(name).is_file())
}

fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn version(&self) -> Result<String, EngineError> {
        self.read_version().map(|(text, _)| text)
    }

    fn cpu_model(&self, accel: Accel) -> String {
        match accel {
            Accel::Tcg => "max".into(),
            Accel::Kvm => format!("host ({})", host_cpu_model()),
        }
    }

    fn choose_accel(
        &self,
        choice: AccelChoice,
        probe: &ProbeGuest,
    ) -> Result<AccelDecision, EngineError> {
        accel::choose(
            &self.qemu,
            &self.data_dirs,
            &self.version()?,
            &self.cache_dir,
            choice,
            probe,
        )
    }

    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        self.boot_gated(spec, &mut || Ok(()))
    }

    fn restore(&self, spec: &VmSpec, state: &SavedState) -> Result<Box<dyn Vm>, EngineError> {
        self.restore_gated(spec, state, &mut || Ok(()))
    }

    fn boot_gated(
        &self,
        spec: &VmSpec,
        before_run: BeforeRun<'_>,
    ) -> Result<Box<dyn Vm>, EngineError> {
        let provenance = self.provenance(
            spec,
            self.boot_memory_extra_kib(spec.accel)?,
            shell_port_wanted(),
        )?;
        Ok(Box::new(vm::QemuVm::start(
            &self.launch()?,
            spec,
            vm::Start::Boot(before_run),
            provenance,
        )?))
    }

    fn restore_gated(
        &self,
        spec: &VmSpec,
        state: &SavedState,
        before_run: BeforeRun<'_>,
    ) -> Result<Box<dyn Vm>, EngineError> {
        self.check_provenance(spec, &state.provenance, "saved")?;
        let provenance = self.provenance(
            spec,
            state.provenance.memory_extra_kib,
            state.provenance.shell_port,
        )?;
        Ok(Box::new(vm::QemuVm::start(
            &self.launch()?,
            spec,
            vm::Start::Restore(state, before_run),
            provenance,
        )?))
    }

    fn receive(
        &self,
        spec: &VmSpec,
        provenance: &Provenance,
        incoming: &ferry_engine::Incoming,
    ) -> Result<Box<dyn Vm>, EngineError> {
        self.check_provenance(spec, provenance, "started")?;
        let sender = provenance;
        let provenance =
            self.provenance(spec, provenance.memory_extra_kib, provenance.shell_port)?;
        Ok(Box::new(vm::QemuVm::start(
            &self.launch()?,
            spec,
            vm::Start::Receive(incoming, sender),
            provenance,
        )?))
    }
}

impl QemuEngine {
    /// Refuses a state made by another engine, version, CPU model,
    /// accelerator or size: QEMU would fail on it, less clearly.
    fn check_provenance(
        &self,
        spec: &VmSpec,
        p: &Provenance,
        verb: &str,
    ) -> Result<(), EngineError> {
        let version = self.qemu_version()?;
        let cpu = self.cpu_model(spec.accel);
        let unloadable = match QemuVersion::parse(&p.engine_version) {
            Some(saved) => version.cannot_load(saved),
            None => Some(format!(
                "QEMU {} (this host has {version})",
                p.engine_version
            )),
        };
        let mismatch = [
            (
                p.engine != self.name(),
                format!("engine {} (this is {})", p.engine, self.name()),
            ),
            (unloadable.is_some(), unloadable.unwrap_or_default()),
            (
                p.cpu_model != cpu,
                format!("CPU model '{}' (this host gives '{cpu}')", p.cpu_model),
            ),
            (
                p.accel != spec.accel,
                format!("accelerator {} (this VM would use {})", p.accel, spec.accel),
            ),
            (
                p.memory_mib != spec.memory_mib,
                format!(
                    "{} MiB of memory (asked for {})",
                    p.memory_mib, spec.memory_mib
                ),
            ),
            (
                p.cpus != spec.cpus,
                format!("{} vCPUs (asked for {})", p.cpus, spec.cpus),
            ),
        ];
        if let Some((_, what)) = mismatch.iter().find(|(bad, _)| *bad) {
            return Err(EngineError::Incompatible(format!(
                "it was {verb} with {what}"
            )));
        }
        Ok(())
    }

    /// How QEMU is started here.
    fn launch(&self) -> Result<vm::Launch<'_>, EngineError> {
        Ok(vm::Launch {
            program: &self.qemu,
            data_dirs: &self.data_dirs,
            qemu_img: &self.qemu_img,
            cache_dir: &self.cache_dir,
            bios: self.bios,
            version: self.qemu_version()?,
            confine: &self.confine,
        })
    }

    /// What a VM started now from `spec` is made with; `memory_extra_kib`
    /// is kept from the saved state on a restore, so the size matches, and
    /// so is `shell_port`, so the devices do.
    fn provenance(
        &self,
        spec: &VmSpec,
        memory_extra_kib: u64,
        shell_port: bool,
    ) -> Result<Provenance, EngineError> {
        Ok(Provenance {
            engine: self.name().to_string(),
            engine_version: self.version()?,
            cpu_model: self.cpu_model(spec.accel),
            accel: spec.accel,
            memory_mib: spec.memory_mib,
            memory_extra_kib,
            cpus: spec.cpus,
            shell_port,
        })
    }
}

/// `FERRY_SHELL_PORT=off` boots VMs without the shell channel, as ferry
/// did before it had one: the devices of such a VM (and of packages made
/// from it) are those of older packages. Used to check the fallback.
pub const SHELL_PORT_ENV: &str = "FERRY_SHELL_PORT";

fn shell_port_wanted() -> bool {
    std::env::var(SHELL_PORT_ENV).map_or(true, |v| v != "off")
}

fn host_cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
