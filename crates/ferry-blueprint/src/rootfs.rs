//! Root file systems: busybox only, or Debian via debootstrap (cached), plus
//! the ferry overlay (`/ferry`: init, agent, busybox, agent config) that every
//! guest gets.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_agent_proto::GuestConfig;
use sha2::Digest;

use crate::manifest::NetworkConfig;
use crate::progress::Progress;
use crate::tools::{require, run};
use crate::{BlueprintError, RootfsSpec};

/// The busybox applets (`bin/sh`, `sbin/ip`, ...), from the binary itself.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, BlueprintError> {
    let out = run(
        "busybox --list-full",
        Command::new(busybox).arg("--list-full"),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

/// Fills `stage` with the recipe's root file system.
pub fn prepare(
    spec: &RootfsSpec,
    stage: &Path,
    busybox: &Path,
    cache: &Path,
    progress: &mut dyn Progress,
) -> Result<(), BlueprintError> {
    match spec {
        RootfsSpec::Busybox => {
            progress.step("making a busybox root file system");
            for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "var"] {
                mkdir(&stage.join(dir))?;
            }
            copy(busybox, &stage.join("bin/busybox"))?;
            for applet in busybox_applets(busybox)? {
                let link = stage.join(&applet);
                if applet == "bin/busybox" || link.exists() {
                    continue;
                }
                let depth = applet.matches('/').count();
                let target = format!("{}bin/busybox", "../".repeat(depth));
                std::os::unix::fs::symlink(&target, &link).map_err(BlueprintError::io(&link))?;
            }
            write(&stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
            write(&stage.join("etc/group"), "root:x:0:\n")?;
        }
        RootfsSpec::Empty => {
            progress.step("making an empty root file system (no shell, no tools)");
            for dir in ["etc", "root", "var", "usr/local/bin"] {
                mkdir(&stage.join(dir))?;
            }
            write(
                &stage.join("etc/passwd"),
                "root:x:0:0:root:/root:/nonexistent\n",
            )?;
            write(&stage.join("etc/group"), "root:x:0:\n")?;
        }
        RootfsSpec::Debootstrap { .. } => {
            let tree = debootstrap(spec, cache, progress)?;
            progress.step("copying the cached Debian tree");
            // Hard links: instant and free. Every file ferry writes later is
            // unlinked first (see `write`), so the cache is never changed.
            let linked = Command::new("cp")
                .arg("-al")
                .arg(&tree)
                .arg(stage)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !linked {
                let _ = std::fs::remove_dir_all(stage);
                run(
                    "cp -a of the cached tree",
                    Command::new("cp").arg("-a").arg(&tree).arg(stage),
                )?;
            }
            let RootfsSpec::Debootstrap { remove, .. } = spec else {
                unreachable!("matched above");
            };
            for path in remove {
                // Checked when the recipe was read: absolute, below `/`.
                let target = stage.join(path.trim_start_matches('/'));
                let gone = match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
                    Ok(_) => std::fs::remove_file(&target),
                    Err(_) => Ok(()),
                };
                gone.map_err(BlueprintError::io(&target))?;
            }
            if !remove.is_empty() {
                progress.detail(&format!("removed {}", remove.join(" ")));
            }
        }
    }
    Ok(())
}

/// Runs debootstrap once per distinct spec; the tree is kept in the cache.
fn debootstrap(
    spec: &RootfsSpec,
    cache: &Path,
    progress: &mut dyn Progress,
) -> Result<PathBuf, BlueprintError> {
    let RootfsSpec::Debootstrap {
        suite,
        variant,
        include,
        mirror,
        ..
    } = spec
    else {
        unreachable!("only called for debootstrap recipes");
    };
    let mirror = match mirror {
        Some(m) => m.clone(),
        None => host_mirror()?,
    };
    let key = hex::encode(sha2::Sha256::digest(
        format!("{suite}|{variant}|{}|{mirror}", include.join(",")).as_bytes(),
    ));
    let base = cache.join("rootfs");
    let tree = base.join(&key[..16]);
    if tree.join(".ferry-done").exists() {
        progress.step(&format!("using cached Debian {suite} tree"));
        return Ok(tree);
    }
    require("debootstrap", "debootstrap")?;
    progress.step(&format!(
        "debootstrap {suite} ({variant}, +{}) from {mirror}: about a minute, once",
        include.join(",")
    ));
    let tmp = base.join(format!(".{}.tmp", &key[..16]));
    let _ = std::fs::remove_dir_all(&tmp);
    mkdir(&base)?;
    let log_path = base.join(format!("{}.log", &key[..16]));
    let mut cmd = Command::new("debootstrap");
    cmd.arg(format!("--variant={variant}"));
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg(suite).arg(&tmp).arg(&mirror);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| BlueprintError::ToolFailed {
        what: "debootstrap".into(),
        detail: e.to_string(),
    })?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut log = String::new();
    let mut count = 0;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.starts_with("I: Retrieving") || line.starts_with("I: Extracting") {
            count += 1;
            if count % 40 == 0 {
                progress.detail(&format!("{count} packages retrieved or extracted"));
            }
        } else if line.starts_with("I: ") && !line.starts_with("I: Validating") {
            progress.detail(line.trim_start_matches("I: "));
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().map_err(BlueprintError::io("debootstrap"))?;
    log.push_str(&err_thread.join().unwrap_or_default());
    let _ = std::fs::write(&log_path, &log);
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        let last: Vec<&str> = log.lines().rev().take(3).collect();
        return Err(BlueprintError::ToolFailed {
            what: "debootstrap".into(),
            detail: format!(
                "{} (full log: {})",
                last.into_iter().rev().collect::<Vec<_>>().join(" | "),
                log_path.display()
            ),
        });
    }
    // Downloaded .debs are not needed in the guest.
    let archives = tmp.join("var/cache/apt/archives");
    if let Ok(entries) = std::fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    std::fs::write(tmp.join(".ferry-done"), "").map_err(BlueprintError::io(&tmp))?;
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::rename(&tmp, &tree).map_err(BlueprintError::io(&tree))?;
    Ok(tree)
}

/// The host's Debian mirror, from its apt sources.
fn host_mirror() -> Result<String, BlueprintError> {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(uri) = deb822
        .lines()
        .find_map(|l| {
            l.strip_prefix("URIs:")
                .map(|u| u.split_whitespace().next().unwrap_or("").to_string())
        })
        .filter(|u| !u.is_empty())
    {
        return Ok(uri);
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("deb "))
        .find_map(|l| l.split_whitespace().find(|w| w.contains("://")).map(str::to_string))
        .ok_or_else(|| BlueprintError::BadRecipe {
            path: "rootfs".into(),
            message: "no Debian mirror found in /etc/apt/sources.list{,.d/debian.sources}: set rootfs.mirror in the recipe".into(),
        })
}

/// What the ferry overlay needs to know.
pub struct Overlay<'a> {
    /// The static guest agent binary.
    pub agent: &'a Path,
    /// The static busybox binary.
    pub busybox: &'a Path,
    /// Its applets.
    pub applets: &'a [String],
    /// Written to `/ferry/agent.json`.
    pub guest_config: &'a GuestConfig,
    /// Baked into `/ferry/init`.
    pub network: &'a NetworkConfig,
    /// The guest's hostname.
    pub hostname: &'a str,
    /// Extra files from the recipe.
    pub files: &'a std::collections::BTreeMap<String, String>,
    /// Host-built binaries from the recipe: (guest path, host path).
    pub binaries: &'a [(String, PathBuf)],
}

/// Adds `/ferry` and the files every ferry guest needs to a staged tree.
pub fn add_overlay(stage: &Path, o: &Overlay<'_>) -> Result<(), BlueprintError> {
    let ferry = stage.join("ferry");
    mkdir(&ferry.join("bin"))?;
    for dir in ["proc", "sys", "dev", "run", "tmp", "etc", "root"] {
        mkdir(&stage.join(dir))?;
    }
    copy(o.busybox, &ferry.join("bin/busybox"))?;
    for applet in o.applets {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        let link = ferry.join("bin").join(name);
        if name != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(BlueprintError::io(&link))?;
        }
    }
    copy(o.agent, &ferry.join("ferry-agent"))?;
    let config = serde_json::to_string_pretty(o.guest_config).expect("config serialises");
    write(&ferry.join("agent.json"), &config)?;
    write(&ferry.join("init"), &guest_init(o.network))?;
    set_mode(&ferry.join("init"), 0o755)?;
    write(&stage.join("etc/hostname"), &format!("{}\n", o.hostname))?;
    // Every blueprint gets its own machine id; clones get fresh ones on resume.
    write(
        &stage.join("etc/machine-id"),
        &format!("{}\n", random_machine_id()),
    )?;
    for (path, contents) in o.files {
        let dest = stage.join(path.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            mkdir(parent)?;
        }
        write(&dest, contents)?;
    }
    for (guest_path, host_path) in o.binaries {
        let dest = stage.join(guest_path.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            mkdir(parent)?;
        }
        copy(host_path, &dest)?;
        set_mode(&dest, 0o755)?;
    }
    Ok(())
}

/// `/ferry/init`: run by the initramfs after `switch_root`. It sets up the
/// pseudo file systems and the network, then hands PID 1 to the agent.
fn guest_init(net: &NetworkConfig) -> String {
    format!(
        r#"#!/ferry/bin/busybox sh
# Written by ferry's blueprint builder. Runs as PID 1 on the guest's own disk.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/ferry/bin
bb=/ferry/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb grep -q ' /dev ' /proc/mounts || $bb mount -t devtmpfs devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts devpts /dev/pts
$bb mount -t tmpfs tmpfs /dev/shm
$bb mount -t tmpfs -o mode=0755 tmpfs /run
$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
[ -f /etc/hostname ] && $bb hostname -F /etc/hostname
$bb ip link set lo up
$bb ip link set {iface} up
$bb ip addr add {addr}/{prefix} dev {iface}
$bb ip route add default via {gw}
# The shell server (`ferry shell`) is a process of its own, started before
# the agent and its service, so that neither can take it down.
/ferry/ferry-agent --shell-server &
exec /ferry/ferry-agent
"#,
        iface = net.interface,
        addr = net.guest_address,
        prefix = net.prefix_len,
        gw = net.gateway
    )
}

/// The initramfs `/init`: loads the virtio drivers in order, mounts the root
/// file system and switches to it. With `ferry.probe` on the command line it
/// only says `FERRY-PROBE-OK` and powers off: that is how ferry checks that
/// an accelerator really runs a Linux guest.
///
/// The root file system is the disk (`/dev/vda`), unless the command line
/// names a root image as `ferry.root=URL` (a stateless node: the image is
/// what a boot service hands out, and the node keeps nothing). Then the
/// initramfs brings up the guest's network with `net` (the same addressing
/// `/ferry/init` sets up again later), downloads the image into RAM
/// (retrying while the server does not answer), checks it against the
/// `#sha256=HEX` the URL may carry, and mounts it through a loop device
/// (`fetch_modules`); the disk is not touched. Any failure is one
/// `ferry-init:` line on the console and a power-off.
pub fn initramfs_init(modules: &[String], fetch_modules: &[String], net: &NetworkConfig) -> String {
    format!(
        r#"#!/bin/busybox sh
# Written by ferry's blueprint builder.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {{ echo "ferry-init: $*" >/dev/console; sync; poweroff -f; }}
for m in {modules}; do insmod /lib/modules/$m.ko || fail "cannot load module $m"; done
if grep -q ferry.probe /proc/cmdline; then echo FERRY-PROBE-OK; poweroff -f; fi
root_url=
for w in $(cat /proc/cmdline); do
  case "$w" in ferry.root=*) root_url="${{w#ferry.root=}}" ;; esac
done
if [ -n "$root_url" ]; then
  for m in {fetch_modules}; do insmod /lib/modules/$m.ko || fail "cannot load module $m"; done
  url="${{root_url%%#*}}"
  sum=
  case "$root_url" in *'#sha256='*) sum="${{root_url##*#sha256=}}" ;; esac
  ip link set lo up
  ip link set {iface} up
  ip addr add {addr}/{prefix} dev {iface}
  ip route add default via {gw}
  mount -t tmpfs -o size=95%,mode=0700 tmpfs /ram || fail "cannot mount a tmpfs for the root image"
  i=0
  until wget -q -O /ram/root.img "$url"; do
    i=$((i+1))
    [ $i -ge 6 ] && fail "cannot fetch the root image $url (tried $i times; is the VM's memory larger than the image?)"
    echo "ferry-init: fetching $url failed; try $((i+1)) in $i s" >/dev/console
    rm -f /ram/root.img
    sleep $i
  done
  if [ -n "$sum" ]; then
    got="$(sha256sum /ram/root.img)"
    got="${{got%% *}}"
    [ "$got" = "$sum" ] || fail "the root image $url has sha256 $got, the URL says $sum"
  fi
  mount -t ext4 -o loop,rw /ram/root.img /newroot || fail "cannot mount the root image from $url"
  read up _ < /proc/uptime
  echo "ferry-init: root image from $url in RAM, $(($(stat -c %s /ram/root.img) >> 20)) MiB, at ${{up}} s" >/dev/console
  ip addr flush dev {iface}
  ip link set {iface} down
else
  i=0
  while [ ! -b /dev/vda ]; do
    i=$((i+1)); [ $i -gt 3000 ] && fail "no disk /dev/vda after 30 s"
    usleep 10000
  done
  mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
fi
[ -x /newroot/ferry/init ] || fail "/ferry/init is missing or not executable on the root file system"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /ferry/init
fail "switch_root failed"
"#,
        modules = modules.join(" "),
        fetch_modules = fetch_modules.join(" "),
        iface = net.interface,
        addr = net.guest_address,
        prefix = net.prefix_len,
        gw = net.gateway
    )
}

/// 32 random hex digits, from the kernel's RNG.
fn random_machine_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    hex::encode(bytes)
}

/// Whether an ELF executable needs a dynamic loader (has `PT_INTERP`).
pub fn is_dynamic_elf(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().ok()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

pub(crate) fn mkdir(path: &Path) -> Result<(), BlueprintError> {
    std::fs::create_dir_all(path).map_err(BlueprintError::io(path))
}

/// Writes a file, unlinking any old one first so that a hard-linked cache
/// file is never written through.
pub(crate) fn write(path: &Path, contents: &str) -> Result<(), BlueprintError> {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, contents).map_err(BlueprintError::io(path))
}

pub(crate) fn copy(from: &Path, to: &Path) -> Result<(), BlueprintError> {
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to).map_err(BlueprintError::io(to))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BlueprintError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(BlueprintError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are linked dynamically against glibc.
        assert_eq!(is_dynamic_elf(&me), Some(true));
        assert_eq!(is_dynamic_elf(b"#!/bin/sh\n"), None);
    }
}
