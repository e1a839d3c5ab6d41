//! The lookups behind the node-facing routes, as BSS and cloud-init make
//! them, on a [`StoreState`]: which boot parameters a MAC, name or NID gets,
//! which node an address or MAC is, which groups it is in, and how the
//! kernel command line is completed (`xname=`, `nid=`, `BOOTIF=`, `ds=`).

use crate::ids;
use crate::types::{BootData, BootParams, Component, ImageData, StoreState};

/// The BSS host names that are not xnames.
pub fn is_special_host(name: &str) -> bool {
    name == "Default" || name == "Global" || name.starts_with("Unknown-")
}

/// Store key of boot parameters for a MAC.
pub fn mac_key(mac: &str) -> String {
    format!("mac:{mac}")
}

/// Store key of boot parameters for a host (xname or special name).
pub fn host_key(host: &str) -> String {
    format!("host:{host}")
}

/// Store key of boot parameters for a NID.
pub fn nid_key(nid: i64) -> String {
    format!("nid:{nid}")
}

/// A node as the node-facing routes see it: what is known of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    /// Its component, if the inventory has one.
    pub component: Option<Component>,
    /// The MAC it asked by or its first interface's, normalised.
    pub mac: Option<String>,
}

impl Node {
    /// Its xname, if it has a component.
    pub fn xname(&self) -> Option<&str> {
        self.component.as_ref().map(|c| c.id.as_str())
    }
}

/// How a node asks for its boot script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// `mac=`, normalised.
    Mac(String),
    /// `name=`: an xname (normalised) or another host name.
    Name(String),
    /// `nid=`.
    Nid(i64),
}

impl StoreState {
    /// The interface with this (normalised) MAC.
    pub fn interface_by_mac(&self, mac: &str) -> Option<&crate::types::EthernetInterface> {
        self.interfaces.get(&ids::interface_id(mac))
    }

    /// The first MAC (by interface ID) of a component.
    pub fn first_mac_of(&self, xname: &str) -> Option<String> {
        self.interfaces
            .values()
            .find(|i| i.component_id == xname)
            .map(|i| i.mac_address.clone())
    }

    /// The node with this MAC: known if an interface or boot parameters
    /// name the MAC.
    pub fn node_by_mac(&self, mac: &str) -> Option<Node> {
        let component = self
            .interface_by_mac(mac)
            .and_then(|i| self.components.get(&i.component_id))
            .cloned();
        if component.is_none()
            && self.interface_by_mac(mac).is_none()
            && !self.boot.contains_key(&mac_key(mac))
        {
            return None;
        }
        Some(Node {
            component,
            mac: Some(mac.to_string()),
        })
    }

    /// The node whose interface has this address.
    pub fn node_by_ip(&self, ip: &str) -> Option<Node> {
        let iface = self
            .interfaces
            .values()
            .find(|i| i.ip_addresses.iter().any(|a| a.ip_address == ip))?;
        Some(Node {
            component: self.components.get(&iface.component_id).cloned(),
            mac: Some(iface.mac_address.clone()),
        })
    }

    /// The SMD groups a node is a member of, by label.
    pub fn groups_of(&self, xname: &str) -> Vec<String> {
        self.groups
            .values()
            .filter(|g| g.members.ids.iter().any(|m| m == xname))
            .map(|g| g.label.clone())
            .collect()
    }

    /// The boot parameters a node gets and the node, as BSS looks them up:
    /// by MAC, then by the component's xname, then its NID, then
    /// `Default`. `None` for the node when nothing in the inventory knows
    /// it.
    pub fn boot_for(&self, asked: &Asked) -> (Option<&BootParams>, Option<Node>) {
        let (direct, node) = match asked {
            Asked::Mac(mac) => (self.boot.get(&mac_key(mac)), self.node_by_mac(mac)),
            Asked::Name(name) => {
                let component = self.components.get(name).cloned();
                let node = component.map(|c| Node {
                    mac: self.first_mac_of(&c.id),
                    component: Some(c),
                });
                (self.boot.get(&host_key(name)), node)
            }
            Asked::Nid(nid) => {
                let component = self
                    .components
                    .values()
                    .find(|c| c.nid == Some(*nid))
                    .cloned();
                let node = component.map(|c| Node {
                    mac: self.first_mac_of(&c.id),
                    component: Some(c),
                });
                (self.boot.get(&nid_key(*nid)), node)
            }
        };
        if direct.is_some() {
            return (direct, node);
        }
        let Some(comp) = node.as_ref().and_then(|n| n.component.as_ref()) else {
            return (None, node);
        };
        let found = self
            .boot
            .get(&host_key(&comp.id))
            .or_else(|| comp.nid.and_then(|n| self.boot.get(&nid_key(n))))
            .or_else(|| self.boot.get(&host_key("Default")));
        (found, node)
    }

    /// The boot parameters that belong to this node alone (not `Default`):
    /// where its phone-home is recorded.
    pub fn own_boot_key(&self, node: &Node) -> Option<String> {
        let mut keys = Vec::new();
        if let Some(mac) = &node.mac {
            keys.push(mac_key(mac));
        }
        if let Some(c) = &node.component {
            keys.push(host_key(&c.id));
            if let Some(n) = c.nid {
                keys.push(nid_key(n));
            }
        }
        keys.into_iter().find(|k| self.boot.contains_key(k))
    }
}

/// Whether a space-separated command line has a word starting `name`.
fn param_exists(params: &str, name: &str) -> bool {
    params.split(' ').any(|w| w.starts_with(name))
}

/// Appends `name` + `value` unless the line already has the parameter.
fn check_param(params: &mut String, name: &str, value: &str) {
    if !value.is_empty() && !param_exists(params, name) {
        params.push(' ');
        params.push_str(name);
        params.push_str(value);
    }
}

/// The cloud-init base URL a node is given: per MAC when the MAC is known
/// (ferry's guests share one address, so the source address cannot tell
/// them apart), else the by-address one.
pub fn cloud_init_base(advertise: &str, mac: Option<&str>) -> String {
    match mac {
        Some(mac) => format!("{advertise}/cloud-init/{mac}/"),
        None => format!("{advertise}/cloud-init/"),
    }
}

/// The full command line, completed as BSS completes it: `xname=`, `nid=`,
/// `BOOTIF=01-<mac>`, `ds=nocloud-net;s=<cloud-init base>` unless already
/// there, and `initrd=initrd` first when there is an initrd.
pub fn build_params(bp: &BootParams, node: Option<&Node>, advertise: &str) -> String {
    let mut params = bp.params.trim().to_string();
    let comp = node.and_then(|n| n.component.as_ref());
    let mac = node.and_then(|n| n.mac.as_deref());
    if let Some(c) = comp {
        check_param(&mut params, "xname=", &c.id);
        if let Some(nid) = c.nid {
            check_param(&mut params, "nid=", &nid.to_string());
        }
    }
    if let Some(mac) = mac {
        check_param(
            &mut params,
            "BOOTIF=",
            &format!("01-{}", mac.replace(':', "-")),
        );
    }
    check_param(
        &mut params,
        "ds=",
        &format!("nocloud-net;s={}", cloud_init_base(advertise, mac)),
    );
    let mut params = params.trim().to_string();
    if !bp.initrd.is_empty() {
        let words: Vec<&str> = params
            .split(' ')
            .filter(|w| !w.starts_with("initrd"))
            .collect();
        params = format!("initrd=initrd {}", words.join(" "));
    }
    params.trim().to_string()
}

/// BSS's JSON boot data (`bootscript?…&json=1`).
pub fn boot_data(bp: &BootParams, node: Option<&Node>, advertise: &str) -> BootData {
    BootData {
        params: format!("kernel {}", build_params(bp, node, advertise)),
        kernel: ImageData {
            path: bp.kernel.clone(),
            params: String::new(),
        },
        initrd: ImageData {
            path: bp.initrd.clone(),
            params: String::new(),
        },
    }
}

/// Seconds a node waits before asking again after a failed boot, as in BSS.
pub const RETRY_DELAY_S: u32 = 30;

/// The iPXE script in BSS's form. `chain` is the URL asked again after a
/// failure.
pub fn boot_script(bp: &BootParams, node: Option<&Node>, advertise: &str, chain: &str) -> String {
    let params = build_params(bp, node, advertise);
    let mut s = String::from("#!ipxe\n");
    s.push_str(&format!(
        "kernel --name kernel {} {params} || goto boot_retry\n",
        bp.kernel
    ));
    if !bp.initrd.is_empty() {
        s.push_str(&format!(
            "initrd --name initrd {} || goto boot_retry\n",
            bp.initrd
        ));
    }
    s.push_str("boot || goto boot_retry\n:boot_retry\n");
    s.push_str(&format!("sleep {RETRY_DELAY_S}\nchain {chain}\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            component: Some(Component {
                id: "x1c0s0b0n0".into(),
                nid: Some(7),
                ..Component::default()
            }),
            mac: Some("aa:bb:cc:00:11:22".into()),
        }
    }

    #[test]
    fn params_are_completed_as_bss_does() {
        let bp = BootParams {
            params: "console=ttyS0 initrd=old nid=3".into(),
            kernel: "http://h/k".into(),
            initrd: "http://h/i".into(),
            ..BootParams::default()
        };
        let p = build_params(&bp, Some(&node()), "http://10.0.0.1:27778");
        assert_eq!(
            p,
            "initrd=initrd console=ttyS0 nid=3 xname=x1c0s0b0n0 BOOTIF=01-aa-bb-cc-00-11-22 ds=nocloud-net;s=http://10.0.0.1:27778/cloud-init/aa:bb:cc:00:11:22/"
        );
    }

    #[test]
    fn the_script_has_bss_form() {
        let bp = BootParams {
            params: "console=ttyS0".into(),
            kernel: "http://h/k".into(),
            initrd: "http://h/i".into(),
            ..BootParams::default()
        };
        let s = boot_script(
            &bp,
            None,
            "http://a",
            "http://a/boot/v1/bootscript?mac=x&retry=1",
        );
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "#!ipxe");
        assert!(lines[1].starts_with("kernel --name kernel http://h/k initrd=initrd console=ttyS0 ds=nocloud-net;s=http://a/cloud-init/"));
        assert!(lines[1].ends_with(" || goto boot_retry"));
        assert_eq!(
            lines[2],
            "initrd --name initrd http://h/i || goto boot_retry"
        );
        assert_eq!(
            &lines[3..],
            [
                "boot || goto boot_retry",
                ":boot_retry",
                "sleep 30",
                "chain http://a/boot/v1/bootscript?mac=x&retry=1"
            ]
        );
    }
}
