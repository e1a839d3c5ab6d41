//! The guest kernel: Debian's cloud kernel package, fetched with
//! `apt-get download` and unpacked with `dpkg -x` into the cache, once.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::progress::Progress;
use crate::tools::{require, run};
use crate::BlueprintError;

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// Returns the unpacked kernel for `package`, fetching it into `cache` if it
/// is not there yet.
pub fn fetch(
    package: &str,
    cache: &Path,
    progress: &mut dyn Progress,
) -> Result<KernelTree, BlueprintError> {
    require("apt-get", "apt")?;
    require("dpkg", "dpkg")?;
    let image = resolve(package)?;
    let version = package_version(&image)?;
    let dir = cache.join("kernels").join(format!("{image}_{version}"));
    if !dir.join("done").exists() {
        progress.step(&format!("fetching guest kernel {image} {version}"));
        let tmp = cache.join("kernels").join(format!(".{image}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(BlueprintError::io(&tmp))?;
        run(
            "apt-get download of the guest kernel",
            Command::new("apt-get")
                .args(["download", "-q", &format!("{image}={version}")])
                .current_dir(&tmp),
        )?;
        let deb = std::fs::read_dir(&tmp)
            .map_err(BlueprintError::io(&tmp))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| {
                BlueprintError::Kernel(format!(
                    "apt-get download left no .deb in {}",
                    tmp.display()
                ))
            })?;
        progress.detail(&format!(
            "downloaded {} ({} MiB)",
            deb.file_name().unwrap_or_default().to_string_lossy(),
            std::fs::metadata(&deb).map(|m| m.len() >> 20).unwrap_or(0)
        ));
        let unpacked = tmp.join("x");
        run(
            "dpkg -x of the guest kernel",
            Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked),
        )?;
        std::fs::remove_file(&deb).map_err(BlueprintError::io(&deb))?;
        std::fs::write(tmp.join("done"), "").map_err(BlueprintError::io(&tmp))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(BlueprintError::io(&dir))?;
    }
    let root = dir.join("x");
    let modules_root = root.join("lib/modules");
    let release = std::fs::read_dir(&modules_root)
        .map_err(BlueprintError::io(&modules_root))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| {
            BlueprintError::Kernel(format!("no modules in {}", modules_root.display()))
        })?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(BlueprintError::Kernel(format!(
            "{} is missing",
            vmlinuz.display()
        )));
    }
    Ok(KernelTree {
        modules: modules_root.join(&release),
        release,
        vmlinuz,
    })
}

/// Follows a metapackage (`linux-image-cloud-amd64`) to the image package it
/// names (`linux-image-6.1.0-56-cloud-amd64`).
fn resolve(package: &str) -> Result<String, BlueprintError> {
    let out = run(
        "apt-cache depends",
        Command::new("apt-cache").args(["depends", package]),
    )
    .map_err(|_| no_package(package))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Err(no_package(package));
    }
    let dep = text.lines().find_map(|l| {
        let l = l.trim();
        let name = l.strip_prefix("Depends: ")?;
        let is_image = name.starts_with("linux-image-")
            && name["linux-image-".len()..].starts_with(|c: char| c.is_ascii_digit());
        is_image.then(|| name.to_string())
    });
    Ok(dep.unwrap_or_else(|| package.to_string()))
}

fn package_version(package: &str) -> Result<String, BlueprintError> {
    let out = run(
        "apt-cache show",
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
    )
    .map_err(|_| no_package(package))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .ok_or_else(|| no_package(package))
}

fn no_package(package: &str) -> BlueprintError {
    BlueprintError::Kernel(format!(
        "apt knows no package '{package}': run 'apt-get update' (or check the recipe's kernel.package)"
    ))
}
