//! `load`: puts a static node list (the file `ochami discover static`
//! reads) into a running service through its HTTP API, so it works the
//! same against ferry's service and, for the SMD part, against SMD.
//!
//! It is idempotent: it reads what the service has first and writes only
//! what differs, so loading a list twice creates nothing the second time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::LoadError;
use crate::ids;
use crate::types::{
    Component, ComponentArray, EthernetInterface, EthernetInterfacePatch, Group, IpAddressMapping,
    LoadReport, MemberAdd, Members, NodeList, Problem,
};

/// Parses a node list (YAML, or JSON, which is YAML too).
///
/// # Errors
/// [`LoadError::Parse`].
pub fn parse_node_list(text: &str) -> Result<NodeList, LoadError> {
    serde_yaml_ng::from_str(text).map_err(|e| LoadError::Parse(e.to_string()))
}

/// A node of the list, checked and normalised.
#[derive(Debug)]
struct Wanted {
    component: Component,
    interfaces: Vec<EthernetInterface>,
    groups: Vec<String>,
}

fn check(list: &NodeList) -> Result<Vec<Wanted>, LoadError> {
    let mut seen_macs = BTreeSet::new();
    list.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let who = if n.name.is_empty() {
                format!("#{i}")
            } else {
                n.name.clone()
            };
            let bad = |what: String| LoadError::BadNode {
                node: who.clone(),
                what,
            };
            let x = ids::parse_xname(&n.xname).map_err(|e| bad(format!("xname: {e}")))?;
            if x.kind != "Node" {
                return Err(bad(format!(
                    "xname: '{}' is a {}, not a node",
                    n.xname, x.kind
                )));
            }
            let mut interfaces = Vec::new();
            for (j, iface) in n.interfaces.iter().enumerate() {
                let mac = ids::parse_mac(&iface.mac_addr)
                    .map_err(|e| bad(format!("interfaces[{j}].mac_addr: {e}")))?;
                if !seen_macs.insert(mac.clone()) {
                    return Err(bad(format!(
                        "interfaces[{j}].mac_addr: {mac} is listed twice"
                    )));
                }
                let mut ips = Vec::new();
                for (k, ip) in iface.ip_addrs.iter().enumerate() {
                    ip.ip_addr.parse::<IpAddr>().map_err(|_| {
                        bad(format!(
                            "interfaces[{j}].ip_addrs[{k}].ip_addr: '{}' is not an IP address",
                            ip.ip_addr
                        ))
                    })?;
                    ips.push(IpAddressMapping {
                        ip_address: ip.ip_addr.clone(),
                        network: ip.name.clone(),
                    });
                }
                interfaces.push(EthernetInterface {
                    id: ids::interface_id(&mac),
                    description: n.name.clone(),
                    mac_address: mac,
                    component_id: x.id.clone(),
                    ip_addresses: ips,
                    ..EthernetInterface::default()
                });
            }
            let groups = n
                .groups
                .iter()
                .map(|g| g.trim().to_ascii_lowercase())
                .collect();
            Ok(Wanted {
                component: Component {
                    id: x.id,
                    kind: "Node".into(),
                    nid: Some(n.nid),
                    ..Component::default()
                },
                interfaces,
                groups,
            })
        })
        .collect()
}

/// Talks to the service.
struct Api {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Api {
    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, LoadError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: ureq::Error| {
            if ferry_transport::is_tls_failure(&e) {
                LoadError::Tls {
                    url: url.clone(),
                    detail: e.to_string(),
                }
            } else {
                LoadError::Unreachable {
                    url: url.clone(),
                    detail: e.to_string(),
                }
            }
        };
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut response = match body {
            None => {
                let mut r = ureq::http::Request::builder().method(method).uri(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                let req = r.body(()).map_err(|e| LoadError::Unreachable {
                    url: url.clone(),
                    detail: e.to_string(),
                })?;
                self.agent.run(req).map_err(unreachable)?
            }
            Some(b) => {
                let bytes = serde_json::to_vec(b).expect("requests serialise");
                let mut r = ureq::http::Request::builder()
                    .method(method)
                    .uri(&url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                let req = r.body(bytes).map_err(|e| LoadError::Unreachable {
                    url: url.clone(),
                    detail: e.to_string(),
                })?;
                self.agent.run(req).map_err(unreachable)?
            }
        };
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(unreachable)?;
        if status >= 400 {
            let detail = serde_json::from_str::<Problem>(&text)
                .map(|p| p.detail)
                .unwrap_or(text);
            return Err(LoadError::Refused {
                method,
                url,
                status,
                detail,
            });
        }
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LoadError::Refused {
                method,
                url,
                status,
                detail: format!("unexpected answer: {e}"),
            })
    }

    fn get<T: DeserializeOwned + Default>(&self, path: &str) -> Result<T, LoadError> {
        Ok(self.call::<(), T>("GET", path, None)?.unwrap_or_default())
    }

    fn send<B: Serialize>(
        &self,
        method: &'static str,
        path: &str,
        body: &B,
    ) -> Result<(), LoadError> {
        self.call::<B, serde_json::Value>(method, path, Some(body))
            .map(|_| ())
    }
}

/// Loads `list` into the service at `url` (`http://host:port`), with the
/// token for writes if given.
///
/// # Errors
/// [`LoadError::BadNode`] before anything is written if a node is wrong;
/// [`LoadError::Unreachable`] or [`LoadError::Refused`] from the service.
pub fn load(url: &str, token: Option<&str>, list: &NodeList) -> Result<LoadReport, LoadError> {
    load_tls(url, token, list, None)
}

/// As [`load`], with `tls` (`--ca`, a client certificate) for an
/// `https://` service; without it `https://` trusts the public roots.
///
/// # Errors
/// As [`load`]; [`LoadError::Tls`] when the handshake fails or `tls`'s
/// files cannot be read.
pub fn load_tls(
    url: &str,
    token: Option<&str>,
    list: &NodeList,
    tls: Option<&ferry_transport::ClientTls>,
) -> Result<LoadReport, LoadError> {
    let wanted = check(list)?;
    let tls = tls
        .cloned()
        .unwrap_or_default()
        .ureq_config()
        .map_err(|e| LoadError::Tls {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    );
    let api = Api {
        agent,
        base: url.trim_end_matches('/').to_string(),
        token: token.map(str::to_string),
    };
    let mut report = LoadReport::default();

    let have: ComponentArray = api.get("/hsm/v2/State/Components")?;
    let have: BTreeMap<String, Component> = have
        .components
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    let mut post = Vec::new();
    for w in &wanted {
        match have.get(&w.component.id) {
            Some(c) if c.nid == w.component.nid => report.components_unchanged += 1,
            Some(c) => post.push(Component {
                nid: w.component.nid,
                ..c.clone()
            }),
            None => post.push(w.component.clone()),
        }
    }
    if !post.is_empty() {
        report.components_created = post.len();
        api.send(
            "POST",
            "/hsm/v2/State/Components",
            &ComponentArray {
                components: post,
                force: false,
            },
        )?;
    }

    let have: Vec<EthernetInterface> = api.get("/hsm/v2/Inventory/EthernetInterfaces")?;
    let have: BTreeMap<String, EthernetInterface> =
        have.into_iter().map(|i| (i.id.clone(), i)).collect();
    for want in wanted.iter().flat_map(|w| &w.interfaces) {
        match have.get(&want.id) {
            Some(i)
                if i.component_id == want.component_id && i.ip_addresses == want.ip_addresses =>
            {
                report.interfaces_unchanged += 1
            }
            Some(_) => {
                api.send(
                    "PATCH",
                    &format!("/hsm/v2/Inventory/EthernetInterfaces/{}", want.id),
                    &EthernetInterfacePatch {
                        description: Some(want.description.clone()),
                        component_id: Some(want.component_id.clone()),
                        ip_addresses: Some(want.ip_addresses.clone()),
                    },
                )?;
                report.interfaces_created += 1;
            }
            None => {
                api.send("POST", "/hsm/v2/Inventory/EthernetInterfaces", want)?;
                report.interfaces_created += 1;
            }
        }
    }

    let mut members: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in &wanted {
        for g in &w.groups {
            members.entry(g).or_default().push(&w.component.id);
        }
    }
    let have: Vec<Group> = api.get("/hsm/v2/groups")?;
    let have: BTreeMap<String, Group> = have.into_iter().map(|g| (g.label.clone(), g)).collect();
    for (label, ids) in members {
        match have.get(label) {
            None => {
                api.send(
                    "POST",
                    "/hsm/v2/groups",
                    &Group {
                        label: label.to_string(),
                        members: Members {
                            ids: ids.iter().map(|s| s.to_string()).collect(),
                        },
                        ..Group::default()
                    },
                )?;
                report.groups_created += 1;
                report.members_added += ids.len();
            }
            Some(g) => {
                for id in ids {
                    if !g.members.ids.iter().any(|m| m == id) {
                        api.send(
                            "POST",
                            &format!("/hsm/v2/groups/{label}/members"),
                            &MemberAdd { id: id.to_string() },
                        )?;
                        report.members_added += 1;
                    }
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ochami_static_format_parses_and_is_checked() {
        let list = parse_node_list(
            "nodes:\n- name: node01\n  nid: 1\n  xname: x1000c1s7b0n0\n  groups: [compute]\n  interfaces:\n  - mac_addr: DE:CA:FC:0F:FE:E1\n    ip_addrs:\n    - name: management\n      ip_addr: 172.16.0.1\n",
        )
        .unwrap();
        let w = check(&list).unwrap();
        assert_eq!(w[0].component.id, "x1000c1s7b0n0");
        assert_eq!(w[0].interfaces[0].mac_address, "de:ca:fc:0f:fe:e1");
        assert_eq!(w[0].groups, ["compute"]);
        let mut bad = list.clone();
        bad.nodes[0].interfaces[0].mac_addr = "nope".into();
        assert!(check(&bad).unwrap_err().to_string().contains("mac_addr"));
    }
}
