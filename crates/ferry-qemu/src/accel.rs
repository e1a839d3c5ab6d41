//! Choosing the accelerator by trying it.
//!
//! `/dev/kvm` existing proves little: on some nested or paravirtual hosts KVM
//! runs toy guests but an unmodified Linux kernel dies on its first
//! `cmpxchg16b` or `xsave`. So `auto` boots the blueprint's own kernel under
//! KVM with `ferry.probe` on its command line and waits for the probe marker.
//! The verdict is cached per (QEMU, host kernel, CPU, KVM module, guest
//! kernel), so only the first boot on a host pays for the probe.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_engine::{Accel, AccelChoice, AccelDecision, EngineError, ProbeGuest, PROBE_MARKER};
use sha2::Digest;

/// How long a KVM probe boot may take in all. A real KVM host boots the probe
/// in about a second; a nested lab (KVM inside an emulated VM) in tens.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(180);

/// How long the probe guest may print nothing before KVM is judged unable to
/// run it. Where KVM cannot run Linux, the guest stops printing right after
/// the boot stub and spins; a working guest prints kernel messages steadily
/// (`earlyprintk`), even nested.
pub const PROBE_STALL: Duration = Duration::from_secs(20);

/// Why `/dev/kvm` cannot be used at all, or `None` if it opens.
pub fn kvm_device_problem() -> Option<String> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Some("/dev/kvm is not present".into());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
    }
}

/// Decides the accelerator; see the module documentation.
pub fn choose(
    qemu: &Path,
    data_dirs: &[PathBuf],
    qemu_version: &str,
    cache_dir: &Path,
    choice: AccelChoice,
    probe: &ProbeGuest,
) -> Result<AccelDecision, EngineError> {
    match choice {
        AccelChoice::Tcg => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: Some("chosen with --accel tcg".into()),
        }),
        AccelChoice::Kvm => match kvm_device_problem() {
            None => Ok(AccelDecision {
                accel: Accel::Kvm,
                reason: None,
            }),
            Some(reason) => Err(EngineError::AccelUnavailable {
                accel: Accel::Kvm,
                reason: format!("{reason}; use --accel tcg or auto"),
            }),
        },
        AccelChoice::Auto => {
            if let Some(reason) = kvm_device_problem() {
                return Ok(AccelDecision {
                    accel: Accel::Tcg,
                    reason: Some(reason),
                });
            }
            let cache = cache_file(cache_dir, qemu_version, probe);
            if let Some(decision) = cache
                .as_ref()
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| serde_json::from_slice::<AccelDecision>(&b).ok())
            {
                return Ok(decision);
            }
            let decision = match probe_kvm(qemu, data_dirs, probe) {
                Ok(()) => AccelDecision {
                    accel: Accel::Kvm,
                    reason: None,
                },
                Err(why) => AccelDecision {
                    accel: Accel::Tcg,
                    reason: Some(format!("KVM cannot boot a Linux guest here: {why}")),
                },
            };
            if let Some(path) = cache {
                let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")));
                let _ = std::fs::write(&path, serde_json::to_vec(&decision).expect("json"));
            }
            Ok(decision)
        }
    }
}

fn cache_file(cache_dir: &Path, qemu_version: &str, probe: &ProbeGuest) -> Option<PathBuf> {
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .unwrap_or_default()
        .to_string();
    let kvm_modules: Vec<String> = ["kvm_intel", "kvm_amd", "kvm_pvm", "kvm"]
        .iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(|m| m.to_string())
        .collect();
    // The kernel by content, not path: every blueprint of one kernel shares
    // the verdict. (The same memo names it in a live move's offer.)
    let kernel = ferry_engine::memo::sha256(cache_dir, &probe.kernel).ok()?;
    let key = format!(
        "{qemu_version}|{}|{cpu}|{}|{kernel}",
        uname.trim(),
        kvm_modules.join(","),
    );
    Some(cache_dir.join("accel").join(format!(
        "{}.json",
        &hex::encode(sha2::Sha256::digest(key))[..16]
    )))
}

/// Boots the probe guest under KVM; `Ok` once it prints the marker.
fn probe_kvm(qemu: &Path, data_dirs: &[PathBuf], probe: &ProbeGuest) -> Result<(), String> {
    tracing::warn!(
        "checking once whether KVM can boot a Linux guest on this host (up to {} s)",
        PROBE_STALL.as_secs()
    );
    let mut child = Command::new(qemu)
        .args(
            data_dirs
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("-L"), d.as_os_str()]),
        )
        .args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256",
        ])
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(&probe.kernel)
        .arg("-initrd")
        .arg(&probe.initramfs)
        .arg("-append")
        .arg(format!(
            "{} earlyprintk=serial,ttyS0 ferry.probe",
            probe.cmdline.replace(" quiet", "")
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let last_output = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let output_seen = last_output.clone();
    let out_thread = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            *output_seen.lock().expect("probe lock") = Instant::now();
            seen.extend_from_slice(&buf[..n]);
            if seen
                .windows(PROBE_MARKER.len())
                .any(|w| w == PROBE_MARKER.as_bytes())
            {
                return true;
            }
        }
        false
    });
    // QEMU pauses (rather than exits) on a KVM emulation failure, so its
    // error output is watched as it arrives.
    let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let err_sink = err_text.clone();
    let err_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            err_sink
                .lock()
                .expect("stderr lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let kvm_failed = || {
        let text = err_text.lock().expect("stderr lock");
        text.contains("KVM internal error") || text.contains("emulation failure")
    };
    let started = Instant::now();
    let result = loop {
        if out_thread.is_finished() {
            break Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            break Err(());
        }
        if kvm_failed() {
            break Err(());
        }
        if started.elapsed() > PROBE_TIMEOUT
            || last_output.lock().expect("probe lock").elapsed() > PROBE_STALL
        {
            break Err(());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let booted = out_thread.join().unwrap_or(false);
    let _ = err_thread.join();
    let stderr = err_text.lock().expect("stderr lock").clone();
    match (result, booted) {
        (_, true) => Ok(()),
        _ => {
            let detail = stderr
                .lines()
                .find(|l| l.contains("KVM") || l.contains("error"))
                .map(|l| l.trim().to_string())
                .unwrap_or_else(|| {
                    format!(
                        "a probe guest under KVM stopped making progress within {} s",
                        started.elapsed().as_secs()
                    )
                });
            Err(detail)
        }
    }
}
