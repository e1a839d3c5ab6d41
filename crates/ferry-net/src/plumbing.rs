//! A VM namespace's fixed plumbing: the veth pair to the host with its own
//! /30, the default route, IP forwarding and the NAT that hides the guest
//! address behind the namespace's veth address.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::iptables::{Batch, Chain};
use crate::ns::Netns;
use crate::{nl, NetError, NS_VETH_NAME};

/// Host-side subnets come from this /16, one /30 per namespace.
const POOL: [u8; 2] = [10, 201];
pub(crate) const POOL_TEXT: &str = "10.201.0.0/16";
const POOL_SLOTS: u32 = 1 << 14;
/// Serialises subnet choice between ferry processes on this host.
const LOCK_PATH: &str = "/run/ferry/net.lock";

/// What ferry made for one VM namespace, enough to remove it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRecord {
    /// The namespace.
    pub name: String,
    /// The veth end in the host namespace.
    pub host_veth: String,
    /// Its address (the namespace's gateway).
    pub host_addr: Ipv4Addr,
    /// The namespace end's address.
    pub ns_addr: Ipv4Addr,
}

impl NamespaceRecord {
    /// The /30 both ends are on, as `a.b.c.d/30`.
    pub fn subnet(&self) -> String {
        let o = self.host_addr.octets();
        format!("{}.{}.{}.{}/30", o[0], o[1], o[2], o[3] & !3)
    }
}

/// The host-side veth name for namespace `ns`: short (interface names have
/// 15 bytes) and stable, so a crashed run's link can be found again.
pub fn host_veth_name(ns: &str) -> String {
    let digest = Sha256::digest(ns.as_bytes());
    format!("fy{}", &hex::encode(digest)[..8])
}

/// The chain in a VM namespace that NATs the guest out of its veth.
fn nat_chain() -> Chain {
    Chain {
        table: "nat",
        parent: "POSTROUTING",
        name: "FERRY-NAT".into(),
    }
}

/// Creates namespace `name` with its veth link, addresses, route,
/// forwarding and NAT. On failure nothing of it is left.
pub fn provision(name: &str) -> Result<(Netns, NamespaceRecord), NetError> {
    let ns = Netns::create(name)?;
    let mut rules = Batch::default();
    let built = build(&ns, &mut rules).and_then(|rec| {
        rules.apply(Some(&ns), true)?;
        Ok(rec)
    });
    match built {
        Ok(rec) => Ok((ns, rec)),
        Err(e) => {
            drop(ns);
            let _ = unprovision(name);
            Err(e)
        }
    }
}

/// Links namespace `ns` (just made) to the host: veth pair, addresses,
/// route, forwarding; its NAT rules are added to `rules`, for the caller to
/// apply with its own in one `iptables-restore`. The caller removes the
/// namespace on failure ([`unprovision`] also takes the host's veth end).
pub(crate) fn build(ns: &Netns, rules: &mut Batch) -> Result<NamespaceRecord, NetError> {
    let host_veth = host_veth_name(ns.name());
    let rec = {
        let _lock = lock()?;
        let (host_addr, ns_addr) = free_subnet()?;
        nl::create_veth(
            &host_veth,
            &format!("ferry:{}", ns.name()),
            ns,
            NS_VETH_NAME,
        )?;
        nl::configure(None, &host_veth, None, host_addr, 30)?;
        NamespaceRecord {
            name: ns.name().to_string(),
            host_veth,
            host_addr,
            ns_addr,
        }
    };
    nl::configure(Some(ns), NS_VETH_NAME, None, rec.ns_addr, 30)?;
    nl::loopback_up(ns)?;
    nl::default_route(ns, rec.host_addr)?;
    set_ip_forward(Some(ns), "1")?;
    let chain = nat_chain();
    rules.install(&chain);
    // Whatever the guest's address (blueprints may choose), it leaves as
    // the namespace's veth address.
    rules.append(&chain, &["-o", NS_VETH_NAME, "-j", "MASQUERADE"]);
    Ok(rec)
}

/// Removes a namespace ferry provisioned, host veth first (so that it is
/// gone when this returns, not whenever the kernel frees the namespace).
pub fn unprovision(name: &str) -> Result<(), NetError> {
    nl::delete_link(None, &host_veth_name(name))?;
    crate::ns::remove(name)
}

/// Reads (`None`) or writes `net.ipv4.ip_forward` in `ns` (or here).
pub fn set_ip_forward(ns: Option<&Netns>, value: &str) -> Result<(), NetError> {
    let write = || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", value)
            .map_err(NetError::io("setting net.ipv4.ip_forward"))
    };
    match ns {
        Some(ns) => ns.run(write)?,
        None => write(),
    }
}

/// The current `net.ipv4.ip_forward` in the caller's namespace.
pub fn ip_forward() -> Result<String, NetError> {
    Ok(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map_err(NetError::io("reading net.ipv4.ip_forward"))?
        .trim()
        .to_string())
}

fn free_subnet() -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
    let used: std::collections::HashSet<u32> = nl::host_addresses()?
        .into_iter()
        .map(|a| u32::from(a) & !3)
        .collect();
    let base = u32::from(Ipv4Addr::new(POOL[0], POOL[1], 0, 0));
    for slot in 0..POOL_SLOTS {
        let net = base + slot * 4;
        if !used.contains(&net) {
            return Ok((Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2)));
        }
    }
    Err(NetError::NoFreeSubnet(POOL_TEXT.into()))
}

/// An exclusive lock on a file, released on drop.
#[derive(Debug)]
pub(crate) struct FileLock(#[allow(dead_code)] File);

fn lock() -> Result<FileLock, NetError> {
    let path = std::path::Path::new(LOCK_PATH);
    std::fs::create_dir_all(path.parent().expect("has a parent"))
        .map_err(NetError::io("creating /run/ferry"))?;
    let file = File::create(path).map_err(NetError::io(format!("opening {LOCK_PATH}")))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(NetError::io(format!("locking {LOCK_PATH}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(FileLock(file))
}

/// Takes the non-blocking lock at `path`, writing `holder` into it; if
/// another process holds it, returns what that one wrote.
pub(crate) fn try_lock(
    path: &std::path::Path,
    holder: &str,
) -> Result<Result<FileLock, String>, NetError> {
    use std::io::{Read, Seek, Write};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(NetError::io(format!("creating {}", dir.display())))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(NetError::io(format!("opening {}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Ok(Err(text.trim().to_string()));
    }
    let _ = file.set_len(0);
    let _ = file.seek(std::io::SeekFrom::Start(0));
    let _ = file.write_all(holder.as_bytes());
    Ok(Ok(FileLock(file)))
}
