//! VM networking for ferry, after Drafter's design: every VM runs in its own
//! network namespace (a *VM namespace*), where the guest always has the same
//! address ([`GUEST_ADDR`], gateway [`GATEWAY_ADDR`] on a tap), so a snapshot
//! resumes in any namespace on any host unchanged. A veth pair links each VM
//! namespace to the host (the namespace ferry runs in), each with its own
//! small host-side subnet, and NAT in the VM namespace hides the guest
//! address behind it.
//!
//! - [`ns`]: named namespaces (compatible with `ip netns`).
//! - [`vmnet`]: one VM's namespace, tap, gateway and exposures, torn down
//!   exactly as far as ferry built them.
//! - [`expose`]: `--expose HOSTADDR:HOSTPORT:GUESTPORT`, a userspace proxy.
//! - [`hostnet`]: `ferry net up/down`: pre-made namespaces with NAT to a
//!   host interface.
#![warn(missing_docs)]

use std::net::Ipv4Addr;

mod error;
pub mod expose;
pub mod hostnet;
mod iptables;
mod nl;
pub mod ns;
mod plumbing;
mod tap;
pub mod vmnet;

pub use error::NetError;
pub use expose::ExposeSpec;
pub use plumbing::NamespaceRecord;
pub use vmnet::{PendingNetwork, VmNetOptions, VmNetwork};

/// The guest's address in every VM namespace (set by the blueprint's init).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 100, 100, 2);
/// The guest's gateway: the tap's address in the VM namespace.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(172, 100, 100, 1);
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// The tap's name inside every VM namespace.
pub const TAP_NAME: &str = "tap0";
/// The veth end's name inside every VM namespace.
pub const NS_VETH_NAME: &str = "veth0";
/// The tap's MAC address, the same in every namespace: a resumed guest's
/// ARP cache still names the gateway by this address.
pub const TAP_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xfe, 0x44, 0x00];

/// The guest's side of its link, as the blueprint sets it (the defaults
/// are [`GUEST_ADDR`], [`GATEWAY_ADDR`] and [`GUEST_PREFIX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// Its gateway: the tap's address.
    pub gateway: Ipv4Addr,
    /// The link's prefix length.
    pub prefix: u8,
    /// The guest NIC's MAC, if known: the namespace then has the guest's
    /// neighbour entry before the guest runs, and the first connection to
    /// a guest that has just resumed or arrived does not wait for an ARP
    /// answer from it (see `nl::add_neighbour`).
    pub mac: Option<[u8; 6]>,
}

impl Default for GuestNet {
    fn default() -> Self {
        GuestNet {
            guest: GUEST_ADDR,
            gateway: GATEWAY_ADDR,
            prefix: GUEST_PREFIX,
            mac: None,
        }
    }
}

/// A MAC address written `aa:bb:cc:dd:ee:ff` (either case); `None` for
/// anything else.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        // (`from_str_radix` alone takes a sign: "+2".)
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Whether this process runs as root (namespaces, taps and NAT need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_is_six_hex_pairs() {
        assert_eq!(
            parse_mac("52:54:00:FE:44:01"),
            Some([0x52, 0x54, 0x00, 0xfe, 0x44, 0x01])
        );
        for bad in [
            "",
            "52:54:00:fe:44",
            "52:54:00:fe:44:01:02",
            "52:54:00:fe:4:001",
            "52:54:00:fe:44:zz",
            "+2:54:00:fe:44:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
