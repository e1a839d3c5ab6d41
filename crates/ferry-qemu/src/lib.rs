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
mod qmp;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferry_engine::{
    Accel, AccelChoice, AccelDecision, Engine, EngineError, ProbeGuest, Provenance, SavedState, Vm,
    VmSpec,
};

pub use accel::kvm_device_problem;

/// The QEMU program ferry uses unless `$FERRY_QEMU` names another.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// The QEMU engine.
pub struct QemuEngine {
    qemu: PathBuf,
    cache_dir: PathBuf,
    version: OnceLock<String>,
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
        Ok(Self {
            qemu: path,
            cache_dir: cache_dir.to_path_buf(),
            version: OnceLock::new(),
        })
    }

    /// Path of the QEMU binary in use.
    pub fn program(&self) -> &Path {
        &self.qemu
    }
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
        if let Some(v) = self.version.get() {
            return Ok(v.clone());
        }
        let out = Command::new(&self.qemu)
            .arg("--version")
            .output()
            .map_err(|e| EngineError::Io {
                context: format!("running {} --version", self.qemu.display()),
                source: e,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .next()
            .and_then(|l| l.split("version ").nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or(v).to_string())
            .ok_or_else(|| {
                EngineError::StartFailed(format!("unexpected QEMU version output: {text}"))
            })?;
        Ok(self.version.get_or_init(|| version).clone())
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
        accel::choose(&self.qemu, &self.version()?, &self.cache_dir, choice, probe)
    }

    fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        let provenance = self.provenance(spec, vm::memory_extra_kib(spec.accel))?;
        Ok(Box::new(vm::QemuVm::start(
            &self.qemu,
            spec,
            vm::Start::Boot,
            provenance,
        )?))
    }

    fn restore(&self, spec: &VmSpec, state: &SavedState) -> Result<Box<dyn Vm>, EngineError> {
        self.check_provenance(spec, &state.provenance, "saved")?;
        let provenance = self.provenance(spec, state.provenance.memory_extra_kib)?;
        Ok(Box::new(vm::QemuVm::start(
            &self.qemu,
            spec,
            vm::Start::Restore(state),
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
        let provenance = self.provenance(spec, provenance.memory_extra_kib)?;
        Ok(Box::new(vm::QemuVm::start(
            &self.qemu,
            spec,
            vm::Start::Receive(incoming),
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
        let version = self.version()?;
        let cpu = self.cpu_model(spec.accel);
        let mismatch = [
            (
                p.engine != self.name(),
                format!("engine {} (this is {})", p.engine, self.name()),
            ),
            (
                p.engine_version != version,
                format!("QEMU {} (this host has {version})", p.engine_version),
            ),
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

    /// What a VM started now from `spec` is made with; `memory_extra_kib`
    /// is kept from the saved state on a restore, so the size matches.
    fn provenance(&self, spec: &VmSpec, memory_extra_kib: u64) -> Result<Provenance, EngineError> {
        Ok(Provenance {
            engine: self.name().to_string(),
            engine_version: self.version()?,
            cpu_model: self.cpu_model(spec.accel),
            accel: spec.accel,
            memory_mib: spec.memory_mib,
            memory_extra_kib,
            cpus: spec.cpus,
        })
    }
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
