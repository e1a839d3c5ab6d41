//! Which kernel modules the initramfs loads, and in what order.
//!
//! Debian's kernel package ships no `modules.dep` (its postinst runs depmod),
//! so the dependencies are read from each module's own `.modinfo`
//! (`depends=a,b`), and a depth-first walk loads every module after the ones
//! it needs. Modules built into the kernel (`modules.builtin`) are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::BlueprintError;

/// The drivers every ferry guest needs: the virtio transport, disk, network,
/// the agent's serial port, and the root file system.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
];

/// The virtio transport on PCI, loaded (after `virtio_mmio`, before the
/// device drivers) when the kernel has it: a netbooted guest runs on a PC
/// machine whose devices are on PCI (`ferry boot --from-bss --netboot`),
/// and the same initramfs must find its disk, NIC and agent port there. On
/// `microvm` it finds no device and costs a few tens of KiB.
pub const PCI_MODULES: &[&str] = &["virtio_pci"];

/// Drivers the initramfs loads only when the command line asks it to fetch
/// its root image over the network (`ferry.root=URL`): the image is a file
/// in RAM, mounted through a loop device. Every initramfs carries them
/// (a few tens of KiB), so that any blueprint can boot that way.
pub const ROOT_FETCH_MODULES: &[&str] = &["loop"];

/// Those of `names` this kernel has (as a module file or built in).
pub fn present<'a>(modules_dir: &Path, names: &[&'a str]) -> Result<Vec<&'a str>, BlueprintError> {
    let mut files = BTreeMap::new();
    collect_ko(&modules_dir.join("kernel"), &mut files)?;
    let builtin_path = modules_dir.join("modules.builtin");
    let builtin =
        std::fs::read_to_string(&builtin_path).map_err(BlueprintError::io(&builtin_path))?;
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    Ok(names
        .iter()
        .filter(|n| {
            let n = normalise(n);
            files.contains_key(&n) || builtin.contains(&n)
        })
        .copied()
        .collect())
}

/// The modules every guest loads, in the order asked: [`GUEST_MODULES`]
/// with those of [`PCI_MODULES`] the kernel has after the first (the
/// virtio-mmio transport).
pub fn guest_modules(modules_dir: &Path) -> Result<Vec<&'static str>, BlueprintError> {
    let mut wanted = vec![GUEST_MODULES[0]];
    wanted.extend(present(modules_dir, PCI_MODULES)?);
    wanted.extend(&GUEST_MODULES[1..]);
    Ok(wanted)
}

/// Modules to load, in load order, with their files.
pub fn load_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, BlueprintError> {
    let mut files = BTreeMap::new();
    collect_ko(&modules_dir.join("kernel"), &mut files)?;
    let builtin_path = modules_dir.join("modules.builtin");
    let builtin: BTreeSet<String> = std::fs::read_to_string(&builtin_path)
        .map_err(BlueprintError::io(&builtin_path))?
        .lines()
        .map(module_name)
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(&normalise(name), &files, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<(), BlueprintError> {
    if seen.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if depth > 64 {
        return Err(BlueprintError::Kernel(format!(
            "module dependency loop at {name}"
        )));
    }
    let path = files
        .get(name)
        .ok_or_else(|| BlueprintError::Kernel(format!("the kernel has no module '{name}'")))?;
    let bytes = std::fs::read(path).map_err(BlueprintError::io(path))?;
    for dep in depends(&bytes) {
        visit(&dep, files, builtin, seen, order, depth + 1)?;
    }
    seen.insert(name.to_string());
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[start + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(normalise)
        .collect()
}

fn collect_ko(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<(), BlueprintError> {
    for entry in std::fs::read_dir(dir).map_err(BlueprintError::io(dir))? {
        let path = entry.map_err(BlueprintError::io(dir))?.path();
        if path.is_dir() {
            collect_ko(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "ko") {
            out.insert(module_name(&path.to_string_lossy()), path);
        }
    }
    Ok(())
}

/// `kernel/fs/ext4/ext4.ko` → `ext4`; dashes and underscores are one.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalise(file.strip_suffix(".ko").unwrap_or(file))
}

fn normalise(name: &str) -> String {
    name.trim().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,virtio-ring\0name=x\0";
        assert_eq!(depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"nothing").is_empty());
    }

    #[test]
    fn orders_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(k.join("virtio_ring.ko"), b"\0depends=\0").unwrap();
        std::fs::write(k.join("virtio.ko"), b"\0depends=virtio_ring\0").unwrap();
        std::fs::write(
            k.join("virtio_net.ko"),
            b"\0depends=virtio_ring,virtio,net_failover\0",
        )
        .unwrap();
        std::fs::write(k.join("net_failover.ko"), b"\0depends=failover\0").unwrap();
        std::fs::write(k.join("failover.ko"), b"\0depends=\0").unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let order: Vec<String> = load_order(dir.path(), &["virtio_net", "ext4"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        let e = load_order(dir.path(), &["nope"]).unwrap_err().to_string();
        // Optional modules: only those the kernel has (file or built in).
        assert_eq!(
            present(dir.path(), &["virtio_net", "nope", "virtio_pci"]).unwrap(),
            vec!["virtio_net"]
        );
        assert!(e.contains("no module 'nope'"), "{e}");
    }
}
