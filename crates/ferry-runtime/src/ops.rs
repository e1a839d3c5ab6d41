//! What the `ferry` commands do, as library calls (the binary only parses
//! arguments and prints). Tests call these too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_agent_proto::b64_decode;
use ferry_blueprint::Blueprint;
use ferry_engine::{AccelChoice, Engine, ProbeGuest};

use crate::control::{call, ControlReply, ControlRequest, ExecOutput};
use crate::supervisor::{describe_exit, NetChoice, RunningVm, SupervisorEvent, VmConfig};
use crate::vmdir::{files, generate_name, running_vm_dir};
use crate::{Paths, RuntimeError};

/// Options of `ferry boot`.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// The blueprint directory.
    pub blueprint: PathBuf,
    /// The VM's name; generated if `None`.
    pub name: Option<String>,
    /// Guest memory; the blueprint's default if `None`.
    pub memory_mib: Option<u64>,
    /// vCPUs; the blueprint's default if `None`.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Shut down as soon as the service is live.
    pub exit_when_live: bool,
    /// How long to wait for live; the blueprint's if `None`.
    pub live_timeout: Option<Duration>,
    /// Copy the guest console to standard error.
    pub echo_console: bool,
    /// When the command started, for the `live in N ms` figure.
    pub started: Instant,
    /// Its network.
    pub net: NetChoice,
}

/// `ferry boot`: cold-boots a blueprint, waits for its service, then either
/// stops (`exit_when_live`) or runs until SIGINT/SIGTERM and shuts the guest
/// down cleanly. `say` receives the lines meant for standard output.
pub fn boot(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &BootOptions,
    say: &mut dyn FnMut(&str),
) -> Result<(), RuntimeError> {
    let blueprint = load_verified(paths, &opts.blueprint)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| generate_name(&blueprint.manifest.recipe));
    let (mut vm, _signals) = boot_until_live(
        engine,
        paths,
        &blueprint,
        &LiveBoot {
            name: name.clone(),
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            accel: opts.accel,
            echo_console: opts.echo_console,
            live_timeout: opts.live_timeout,
            net: opts.net.clone(),
        },
        say,
    )?;
    let (memory_mib, cpus) = (vm.status().memory_mib, vm.status().cpus);
    say(&format!(
        "live in {} ms",
        opts.started.elapsed().as_millis()
    ));
    if let Some(line) = vm.network_summary() {
        say(&line);
    }
    if opts.exit_when_live {
        vm.shutdown()?;
        return Ok(());
    }
    eprintln!(
        "VM '{name}' is running ({} MiB, {cpus} vCPU); run commands in it with 'ferry exec {name} -- CMD'; Ctrl-C shuts it down",
        memory_mib
    );
    match vm.wait_for_signal() {
        Ok(_) => {
            eprintln!("shutting down '{name}'");
            let reason = vm.shutdown()?;
            tracing::info!(reason = describe_exit(&reason), "VM stopped");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// What [`boot_until_live`] needs besides the blueprint.
#[derive(Debug, Clone)]
pub struct LiveBoot {
    /// The VM's name.
    pub name: String,
    /// Guest memory; the blueprint's default if `None`.
    pub memory_mib: Option<u64>,
    /// vCPUs; the blueprint's default if `None`.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Copy the guest console to standard error.
    pub echo_console: bool,
    /// How long to wait for live; the blueprint's if `None`.
    pub live_timeout: Option<Duration>,
    /// Its network.
    pub net: NetChoice,
}

/// Sizes the VM, chooses (and says) the accelerator, cold-boots the
/// blueprint with Ctrl-C wired to the VM, and waits until the service is
/// live: the common start of `ferry boot` and `ferry package`.
pub fn boot_until_live(
    engine: &dyn Engine,
    paths: &Paths,
    blueprint: &Blueprint,
    opts: &LiveBoot,
    say: &mut dyn FnMut(&str),
) -> Result<(RunningVm, SignalForwarder), RuntimeError> {
    let m = &blueprint.manifest;
    let (memory_mib, cpus) = plan_vm(blueprint, opts.memory_mib, opts.cpus)?;
    crate::vmdir::validate_name(&opts.name)?;
    let decision = engine.choose_accel(
        opts.accel,
        &ProbeGuest {
            kernel: blueprint.kernel(),
            initramfs: blueprint.initramfs(),
            cmdline: m.cmdline.clone(),
        },
    )?;
    say(&decision.to_string());
    let config = VmConfig {
        name: opts.name.clone(),
        memory_mib,
        cpus,
        accel: decision.accel,
        echo_console: opts.echo_console,
        net: opts.net.clone(),
    };
    let mut vm = RunningVm::boot(engine, paths, &blueprint.into(), &config)?;
    let signals = forward_signals(&vm)?;
    vm.wait_live(
        opts.live_timeout
            .unwrap_or(Duration::from_secs(m.live_timeout_s)),
    )?;
    Ok((vm, signals))
}

/// Loads a blueprint and checks its files against their sha256 sums (a
/// file unchanged since its last check is not hashed again).
pub fn load_verified(paths: &Paths, dir: &std::path::Path) -> Result<Blueprint, RuntimeError> {
    let blueprint = Blueprint::load(dir)?;
    blueprint.verify(Some(&paths.cache.join("verified")))?;
    Ok(blueprint)
}

/// The memory and vCPUs a VM of `blueprint` gets: the user's choice or the
/// blueprint's default, checked against the recipe's minimum.
pub fn plan_vm(
    blueprint: &Blueprint,
    memory_mib: Option<u64>,
    cpus: Option<u32>,
) -> Result<(u64, u32), RuntimeError> {
    let d = &blueprint.manifest.defaults;
    let memory_mib = memory_mib.unwrap_or(d.memory_mib);
    if memory_mib < d.min_memory_mib {
        return Err(RuntimeError::MemoryTooSmall {
            asked: memory_mib,
            min: d.min_memory_mib,
            recipe: blueprint.manifest.recipe.clone(),
        });
    }
    let cpus = cpus.unwrap_or(d.cpus);
    if cpus == 0 || cpus > 64 {
        return Err(RuntimeError::BadOption(format!(
            "--cpus {cpus} is out of range: use 1 to 64"
        )));
    }
    Ok((memory_mib, cpus))
}

/// Forwards SIGINT and SIGTERM into the VM's event channel for as long as
/// the returned handle lives.
pub fn forward_signals(vm: &RunningVm) -> Result<SignalForwarder, RuntimeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(RuntimeError::io("signal handler"))?;
    let handle = signals.handle();
    let sender = vm.event_sender();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sender.send(SupervisorEvent::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map_err(RuntimeError::io("signal thread"))?;
    Ok(SignalForwarder(handle))
}

/// Stops forwarding signals when dropped.
pub struct SignalForwarder(signal_hook::iterator::Handle);

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Output of `ferry exec`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code.
    pub exit_code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Whether output was cut.
    pub truncated: bool,
    /// Whether the command hit its timeout.
    pub timed_out: bool,
}

/// `ferry exec NAME -- CMD...`: runs a command in a running VM.
pub fn exec(
    paths: &Paths,
    name: &str,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
) -> Result<ExecResult, RuntimeError> {
    if argv.is_empty() {
        return Err(RuntimeError::BadOption(
            "no command given: use 'ferry exec NAME -- CMD [ARGS...]'".into(),
        ));
    }
    let dir = running_vm_dir(paths, name)?;
    let request = ControlRequest::Exec {
        argv,
        stdin_b64: stdin.as_deref().and_then(crate::supervisor::stdin_payload),
        timeout_ms: timeout.map(|t| t.as_millis() as u64),
    };
    let wait = timeout.unwrap_or(Duration::from_secs(3600)) + Duration::from_secs(30);
    match call(&dir.join(files::CONTROL), &request, wait)? {
        ControlReply::Exec(ExecOutput {
            exit_code,
            stdout_b64,
            stderr_b64,
            truncated,
            timed_out,
        }) => Ok(ExecResult {
            exit_code,
            stdout: b64_decode(&stdout_b64).map_err(|e| RuntimeError::Agent(e.to_string()))?,
            stderr: b64_decode(&stderr_b64).map_err(|e| RuntimeError::Agent(e.to_string()))?,
            truncated,
            timed_out,
        }),
        // The supervisor's message may be an agent error already.
        ControlReply::Error { message } => Err(RuntimeError::Agent(
            message
                .strip_prefix("guest agent: ")
                .map(String::from)
                .unwrap_or(message),
        )),
        other => Err(RuntimeError::Agent(format!("unexpected reply: {other:?}"))),
    }
}
