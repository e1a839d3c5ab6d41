//! `ferry blueprint build`: recipe in, blueprint directory out. Everything is
//! written to a temporary directory beside the output and renamed into place
//! at the end, so an interrupted or failed build leaves no half-written
//! blueprint and never destroys the previous one.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_agent_proto::{GuestConfig, Liveness, PROTOCOL_VERSION};

use crate::cpio::CpioWriter;
use crate::manifest::{FileEntry, Manifest, FORMAT_VERSION, MANIFEST};
use crate::progress::Progress;
use crate::rootfs::{self, Overlay};
use crate::tools::{require, run};
use crate::{kernel, modules, sha256_file, Blueprint, BlueprintError, HostBinaries, Recipe};

/// What to build and where.
pub struct BuildOptions<'a> {
    /// The recipe.
    pub recipe: Recipe,
    /// The blueprint directory to create.
    pub out: PathBuf,
    /// Downloads and debootstrap trees are kept here.
    pub cache_dir: PathBuf,
    /// The static `ferry-agent` binary to put into the guest.
    pub agent: PathBuf,
    /// Where the binaries the recipe names in `[binaries]` are found.
    pub binaries: HostBinaries,
    /// Replace an existing output directory.
    pub force: bool,
    /// Where progress goes.
    pub progress: &'a mut dyn Progress,
}

/// Builds a blueprint; see the module documentation.
pub fn build(opts: BuildOptions<'_>) -> Result<Blueprint, BlueprintError> {
    let out = absolute(&opts.out);
    if out.exists() && !opts.force {
        return Err(BlueprintError::OutputExists(out));
    }
    let parent = out.parent().unwrap_or(Path::new("/")).to_path_buf();
    rootfs::mkdir(&parent)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "blueprint".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    rootfs::mkdir(&tmp)?;
    let guard = RemoveOnDrop(Some(tmp.clone()));

    let busybox = require("busybox", "busybox-static")?;
    check_static(
        &busybox,
        "busybox",
        "install busybox-static (the dynamic busybox cannot run in the guest)",
    )?;
    check_static(
        &opts.agent,
        "ferry-agent",
        "build it with scripts/build.sh (it must be linked with +crt-static)",
    )?;
    require("mkfs.ext4", "e2fsprogs")?;
    let recipe = &opts.recipe;
    // Before any download: a missing binary is the user's to fix at once.
    let binaries = recipe
        .binaries
        .iter()
        .map(|(guest_path, name)| {
            Ok((guest_path.clone(), opts.binaries.resolve(name, guest_path)?))
        })
        .collect::<Result<Vec<_>, BlueprintError>>()?;
    let progress = opts.progress;

    // Cheap check first: even the smallest build needs its disk's metadata.
    ensure_space(&parent, 64)?;

    let kernel = kernel::fetch(&recipe.kernel.package, &opts.cache_dir, progress)?;
    progress.step(&format!(
        "building the initramfs (kernel {})",
        kernel.release
    ));
    let kernel_file = tmp.join("kernel");
    rootfs::copy(&kernel.vmlinuz, &kernel_file)?;
    let guest_modules = modules::guest_modules(&kernel.modules)?;
    let mods = modules::load_order(&kernel.modules, &guest_modules)?;
    let all: Vec<&str> = guest_modules
        .iter()
        .chain(modules::ROOT_FETCH_MODULES)
        .copied()
        .collect();
    // The modules a fetched root needs beyond the ones always loaded, in
    // load order.
    let fetch_mods: Vec<(String, std::path::PathBuf)> = modules::load_order(&kernel.modules, &all)?
        .into_iter()
        .filter(|(n, _)| !mods.iter().any(|(m, _)| m == n))
        .collect();
    let mut cpio = CpioWriter::new();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "ram",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &read(&busybox)?);
    for (name, path) in mods.iter().chain(&fetch_mods) {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &read(path)?);
    }
    let names: Vec<String> = mods.iter().map(|(n, _)| n.clone()).collect();
    let fetch_names: Vec<String> = fetch_mods.iter().map(|(n, _)| n.clone()).collect();
    cpio.file(
        "init",
        0o755,
        rootfs::initramfs_init(&names, &fetch_names, &recipe.network).as_bytes(),
    );
    let initramfs_file = tmp.join("initramfs");
    let mut f =
        std::fs::File::create(&initramfs_file).map_err(BlueprintError::io(&initramfs_file))?;
    cpio.finish(&mut f)
        .map_err(BlueprintError::io(&initramfs_file))?;
    drop(f);
    progress.detail(&format!("modules: {}", names.join(" ")));

    let stage = tmp.join("rootfs");
    rootfs::prepare(&recipe.rootfs, &stage, &busybox, &opts.cache_dir, progress)?;
    progress.step("adding the ferry agent and init");
    let service = recipe.service.as_ref();
    let guest_config = GuestConfig {
        service: service.map(|s| s.command.clone()),
        env: service
            .map(|s| s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        liveness: recipe.liveness.check.clone(),
        console_shell: recipe.console_shell,
    };
    let applets = rootfs::busybox_applets(&busybox)?;
    let hostname = format!("ferry-{}", recipe.name);
    rootfs::add_overlay(
        &stage,
        &Overlay {
            agent: &opts.agent,
            busybox: &busybox,
            applets: &applets,
            guest_config: &guest_config,
            network: &recipe.network,
            hostname: &hostname,
            files: &recipe.files,
            binaries: &binaries,
        },
    )?;
    for (guest_path, host_path) in &binaries {
        progress.detail(&format!("{guest_path} from {}", host_path.display()));
    }

    let used_mib = du_mib(&stage)?;
    if used_mib + 16 > recipe.disk.size_mib {
        return Err(BlueprintError::BadRecipe {
            path: recipe.name.clone(),
            message: format!(
                "the root file system needs {used_mib} MiB but disk.size_mib is {}: raise disk.size_mib",
                recipe.disk.size_mib
            ),
        });
    }
    // mkfs writes the data plus metadata and journal; the rest stays sparse.
    ensure_space(&parent, used_mib + used_mib / 5 + 48)?;
    progress.step(&format!(
        "making the {} MiB ext4 disk ({used_mib} MiB of files)",
        recipe.disk.size_mib
    ));
    let disk_file = tmp.join("disk.ext4");
    let disk = std::fs::File::create(&disk_file).map_err(BlueprintError::io(&disk_file))?;
    disk.set_len(recipe.disk.size_mib << 20)
        .map_err(BlueprintError::io(&disk_file))?;
    drop(disk);
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "ferry-root", "-E", "root_owner=0:0", "-d"])
            .arg(&stage)
            .arg(&disk_file),
    )?;
    let binary_sums = binaries
        .iter()
        .map(|(guest_path, _)| {
            let (sha256, _) = sha256_file(&stage.join(guest_path.trim_start_matches('/')))?;
            Ok((guest_path.clone(), sha256))
        })
        .collect::<Result<_, BlueprintError>>()?;
    std::fs::remove_dir_all(&stage).map_err(BlueprintError::io(&stage))?;

    progress.step("writing the manifest");
    let entry = |file: &str| -> Result<FileEntry, BlueprintError> {
        let (sha256, size) = sha256_file(&tmp.join(file))?;
        Ok(FileEntry {
            file: file.to_string(),
            sha256,
            size,
        })
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        recipe: recipe.name.clone(),
        built_by: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        kernel_release: kernel.release.clone(),
        cmdline: recipe.kernel.cmdline.clone(),
        defaults: recipe.defaults,
        network: recipe.network.clone(),
        service: service.map(|s| s.command.clone()),
        liveness: recipe.liveness.check.clone(),
        live_timeout_s: recipe.liveness.timeout_s,
        agent_protocol: PROTOCOL_VERSION,
        binaries: binary_sums,
        kernel: entry("kernel")?,
        initramfs: entry("initramfs")?,
        disk: entry("disk.ext4")?,
    };
    let text = toml::to_string_pretty(&manifest).expect("manifest serialises");
    let header = format!(
        "# ferry blueprint, built from recipe '{}'. Files are checked against these sha256 sums on boot.\n",
        recipe.name
    );
    let manifest_path = tmp.join(MANIFEST);
    std::fs::write(&manifest_path, header + &text).map_err(BlueprintError::io(&manifest_path))?;
    sync_dir(&tmp);

    // Swap into place: the old blueprint (if any) is removed only once the
    // new one is complete.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(&out, &old).map_err(BlueprintError::io(&out))?;
    }
    std::fs::rename(&tmp, &out).map_err(BlueprintError::io(&out))?;
    std::mem::forget(guard);
    let _ = std::fs::remove_dir_all(&old);
    sync_dir(&parent);
    if let Liveness::Tcp { port } = manifest.liveness {
        progress.detail(&format!(
            "service is judged live when guest port {port} accepts"
        ));
    }
    Blueprint::load(&out)
}

fn check_static(path: &Path, what: &str, fix: &str) -> Result<(), BlueprintError> {
    let bytes = std::fs::read(path)
        .map_err(|e| BlueprintError::Agent(format!("{}: {e}: {fix}", path.display())))?;
    match rootfs::is_dynamic_elf(&bytes) {
        Some(false) => Ok(()),
        Some(true) => Err(BlueprintError::Agent(format!(
            "{what} at {} is dynamically linked: {fix}",
            path.display()
        ))),
        None => Err(BlueprintError::Agent(format!(
            "{what} at {} is not an x86-64 ELF executable: {fix}",
            path.display()
        ))),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, BlueprintError> {
    std::fs::read(path).map_err(BlueprintError::io(path))
}

fn ensure_space(dir: &Path, need_mib: u64) -> Result<(), BlueprintError> {
    let have_mib = free_mib(dir)?;
    if have_mib < need_mib {
        return Err(BlueprintError::NoSpace {
            dir: dir.to_path_buf(),
            need_mib,
            have_mib,
        });
    }
    Ok(())
}

fn free_mib(dir: &Path) -> Result<u64, BlueprintError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| BlueprintError::io(dir)(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a properly sized,
    // writable statvfs buffer that lives across the call.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(BlueprintError::io(dir)(std::io::Error::last_os_error()));
        }
        st
    };
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 20)
}

/// Apparent size of a tree in MiB (files and symlinks, rounded per file).
fn du_mib(dir: &Path) -> Result<u64, BlueprintError> {
    fn walk(dir: &Path, total: &mut u64) -> Result<(), BlueprintError> {
        for entry in std::fs::read_dir(dir).map_err(BlueprintError::io(dir))? {
            let entry = entry.map_err(BlueprintError::io(dir))?;
            let meta = entry.metadata().map_err(BlueprintError::io(entry.path()))?;
            *total += meta.len().div_ceil(4096) * 4096 + 256;
            if meta.is_dir() {
                walk(&entry.path(), total)?;
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(dir, &mut total)?;
    Ok(total.div_ceil(1 << 20))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
