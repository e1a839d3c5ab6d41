//! `/cloud-init`: nocloud-net data for nodes, as OpenCHAMI's cloud-init
//! service and BSS serve it.
//!
//! A node is found by its source address (an EthernetInterface with that
//! IP address), as OpenCHAMI does, or by the MAC in the path
//! (`/cloud-init/<mac>/meta-data`): ferry's guests all have the same
//! address, so the boot script points each at its own MAC path.
//!
//! - meta-data: the boot parameters' `cloud-init.meta-data`, with
//!   `instance-id` and `local-hostname` filled in, each group's meta-data
//!   under `groups.<name>` and `Global`'s under `Global`, as JSON (which
//!   cloud-init reads as YAML);
//! - user-data: the boot parameters' `cloud-init.user-data`, an object
//!   rendered as a `#cloud-config` YAML document, a string served as is;
//! - vendor-data: an `#include` of the node's groups' cloud-config files
//!   (`<group>.yaml`, served beside it), as OpenCHAMI does;
//! - phone-home: recorded in the node's own boot parameters (as BSS does)
//!   and listed at `GET /cloud-init/phone-home`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;

use super::{json, json_body, pairs, text};
use crate::error::ApiError;
use crate::ids::{self, now_unix, rfc3339};
use crate::model::{cloud_init_base, host_key, Asked, Node};
use crate::types::{
    BootParams, CloudData, FileEncoding, GroupData, Message, PhoneHome, PhoneHomeRecord, StoreState,
};
use crate::AppState;

/// Phone-homes kept; older ones are dropped.
const PHONE_HOME_KEPT: usize = 1000;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/cloud-init/{doc}", get(by_ip))
        .route(
            "/cloud-init/phone-home",
            get(list_phone_home).post(phone_home_by_ip),
        )
        .route("/boot/v1/phone-home", post(phone_home_by_ip))
        .route("/cloud-init/{mac}/{doc}", get(by_mac))
        .route("/cloud-init/{mac}/phone-home", post(phone_home_by_mac))
        .route(
            "/cloud-init/admin/groups",
            get(list_groups).post(post_group),
        )
        .route(
            "/cloud-init/admin/groups/{name}",
            get(get_group).put(put_group).delete(delete_group),
        )
}

/// The peer's address, IPv4-mapped addresses as IPv4.
fn source(peer: SocketAddr) -> String {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_else(|| v6.to_string()),
        ip => ip.to_string(),
    }
}

fn node_by_ip(st: &StoreState, ip: &str) -> Result<Node, ApiError> {
    st.node_by_ip(ip)
        .ok_or_else(|| ApiError::not_found(format!("no EthernetInterface has the address {ip}")))
}

fn node_by_mac(st: &StoreState, mac: &str) -> Result<Node, ApiError> {
    st.node_by_mac(mac).ok_or_else(|| {
        ApiError::not_found(format!(
            "unknown MAC {mac}: no EthernetInterface or boot parameters name it"
        ))
    })
}

fn parse_mac(text: &str) -> Result<String, ApiError> {
    ids::parse_mac(text).map_err(|e| ApiError::bad("mac", e))
}

/// The boot parameters a node gets (by its MAC, else its xname).
fn boot_of(st: &StoreState, node: &Node) -> Option<BootParams> {
    let asked = match (&node.mac, node.xname()) {
        (Some(m), _) => Asked::Mac(m.clone()),
        (None, Some(x)) => Asked::Name(x.to_string()),
        (None, None) => return None,
    };
    st.boot_for(&asked).0.cloned()
}

/// The node's groups with their cloud-init data, if any.
fn groups_of(st: &StoreState, node: &Node) -> Vec<(String, Option<GroupData>)> {
    node.xname()
        .map(|x| st.groups_of(x))
        .unwrap_or_default()
        .into_iter()
        .map(|g| {
            let data = st.cloud_init_groups.get(&g).cloned();
            (g, data)
        })
        .collect()
}

fn meta_data(st: &StoreState, node: &Node) -> CloudData {
    let bp = boot_of(st, node);
    let mut md = bp.and_then(|b| b.cloud_init.meta_data).unwrap_or_default();
    let name = match (node.xname(), &node.mac) {
        (Some(x), _) => x.to_string(),
        (None, Some(m)) => format!("node-{}", ids::interface_id(m)),
        (None, None) => "node".to_string(),
    };
    md.entry("instance-id")
        .or_insert_with(|| format!("i-{name}").into());
    md.entry("local-hostname").or_insert_with(|| name.into());
    let groups = groups_of(st, node);
    if !groups.is_empty() {
        let mut g = CloudData::new();
        for (label, data) in groups {
            let data = data.and_then(|d| d.meta_data).unwrap_or_default();
            g.insert(label, serde_json::Value::Object(data));
        }
        md.insert("groups".into(), serde_json::Value::Object(g));
    }
    if let Some(global) = st
        .boot
        .get(&host_key("Global"))
        .and_then(|b| b.cloud_init.meta_data.clone())
    {
        md.insert("Global".into(), serde_json::Value::Object(global));
    }
    md
}

/// `user-data` as a document: a string as is, an object as
/// `#cloud-config` YAML.
pub(crate) fn user_data_document(value: Option<&serde_json::Value>) -> Result<String, ApiError> {
    match value {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(v @ serde_json::Value::Object(_)) => {
            let yaml = serde_yaml_ng::to_string(v).map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                detail: format!("user-data cannot be rendered as YAML: {e}"),
            })?;
            Ok(format!("#cloud-config\n{yaml}"))
        }
        _ => Ok("#cloud-config\n{}\n".into()),
    }
}

fn vendor_data(st: &StoreState, node: &Node, base: &str) -> String {
    let files: Vec<String> = groups_of(st, node)
        .into_iter()
        .filter(|(_, d)| d.as_ref().is_some_and(|d| d.file.is_some()))
        .map(|(g, _)| format!("{base}{g}.yaml"))
        .collect();
    if files.is_empty() {
        "#cloud-config\n{}\n".into()
    } else {
        format!("#include\n{}\n", files.join("\n"))
    }
}

fn group_file(st: &StoreState, node: &Node, file: &str) -> Result<String, ApiError> {
    let name = file.strip_suffix(".yaml").unwrap_or(file);
    let (_, data) = groups_of(st, node)
        .into_iter()
        .find(|(g, _)| g == name)
        .ok_or_else(|| ApiError::not_found(format!("the node is not in a group {name}")))?;
    let f = data
        .and_then(|d| d.file)
        .ok_or_else(|| ApiError::not_found(format!("group {name} has no cloud-config file")))?;
    decode_file(&f.content, f.encoding).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        detail: e.detail,
    })
}

fn decode_file(content: &str, encoding: FileEncoding) -> Result<String, ApiError> {
    match encoding {
        FileEncoding::Plain => Ok(content.to_string()),
        FileEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(content.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ApiError::bad("file.content", "is not base64 of UTF-8 text")),
    }
}

/// One document for a node; `base` is where its group files are.
fn document(st: &StoreState, node: &Node, doc: &str, base: &str) -> Result<Response, ApiError> {
    match doc {
        "meta-data" => Ok(json(StatusCode::OK, &meta_data(st, node))),
        "user-data" => {
            let bp = boot_of(st, node);
            let ud = bp.as_ref().and_then(|b| b.cloud_init.user_data.as_ref());
            Ok(text("text/yaml", user_data_document(ud)?))
        }
        "vendor-data" => Ok(text("text/yaml", vendor_data(st, node, base))),
        f if f.ends_with(".yaml") => Ok(text("text/yaml", group_file(st, node, f)?)),
        other => Err(ApiError::not_found(format!(
            "no cloud-init document {other}"
        ))),
    }
}

async fn by_ip(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(doc): Path<String>,
) -> Result<Response, ApiError> {
    let ip = source(peer);
    let base = cloud_init_base(&s.advertise, None);
    s.store.read(|st| {
        let node = node_by_ip(st, &ip)?;
        document(st, &node, &doc, &base)
    })
}

async fn by_mac(
    State(s): State<Arc<AppState>>,
    Path((mac, doc)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let mac = parse_mac(&mac)?;
    let base = cloud_init_base(&s.advertise, Some(&mac));
    s.store.read(|st| {
        let node = node_by_mac(st, &mac)?;
        document(st, &node, &doc, &base)
    })
}

/// cloud-init's `phone_home` posts form fields; JSON is accepted too.
fn phone_home_body(headers: &HeaderMap, body: &[u8]) -> Result<PhoneHome, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if is_json {
        return json_body(body);
    }
    let form = pairs(Some(&String::from_utf8_lossy(body)));
    let mut p = PhoneHome::default();
    for (k, v) in form {
        let slot = match k.as_str() {
            "pub_key_dsa" => &mut p.pub_key_dsa,
            "pub_key_rsa" => &mut p.pub_key_rsa,
            "pub_key_ecdsa" => &mut p.pub_key_ecdsa,
            "pub_key_ed25519" => &mut p.pub_key_ed25519,
            "instance_id" => &mut p.instance_id,
            "hostname" => &mut p.hostname,
            "fqdn" => &mut p.fqdn,
            _ => continue,
        };
        *slot = v;
    }
    Ok(p)
}

fn record_phone_home(
    s: &AppState,
    find: impl FnOnce(&StoreState) -> Result<Node, ApiError>,
    source: String,
    data: PhoneHome,
) -> Result<Response, ApiError> {
    s.store.write(|st| {
        let node = find(st)?;
        if let Some(key) = st.own_boot_key(&node) {
            if let Some(bp) = st.boot.get_mut(&key) {
                bp.cloud_init.phone_home = data.clone();
            }
        }
        st.phone_home.push(PhoneHomeRecord {
            xname: node.xname().unwrap_or_default().to_string(),
            mac: node.mac.clone().unwrap_or_default(),
            source,
            received: rfc3339(now_unix()),
            data,
        });
        let excess = st.phone_home.len().saturating_sub(PHONE_HOME_KEPT);
        st.phone_home.drain(..excess);
        Ok::<_, ApiError>(())
    })?;
    Ok(json(
        StatusCode::OK,
        &Message {
            code: 0,
            message: "recorded".into(),
        },
    ))
}

async fn phone_home_by_ip(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let data = phone_home_body(&headers, &body)?;
    let ip = source(peer);
    let find_ip = ip.clone();
    record_phone_home(&s, move |st| node_by_ip(st, &find_ip), ip, data)
}

async fn phone_home_by_mac(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mac = parse_mac(&mac)?;
    let data = phone_home_body(&headers, &body)?;
    record_phone_home(&s, |st| node_by_mac(st, &mac), source(peer), data)
}

async fn list_phone_home(State(s): State<Arc<AppState>>) -> Response {
    let list = s.store.read(|st| st.phone_home.clone());
    json(StatusCode::OK, &list)
}

fn group_name(text: &str) -> Result<String, ApiError> {
    super::smd::label(text).map_err(|e| ApiError::bad("name", e.detail))
}

fn check_group(mut g: GroupData) -> Result<GroupData, ApiError> {
    g.name = group_name(&g.name)?;
    if let Some(f) = &g.file {
        decode_file(&f.content, f.encoding)?;
    }
    Ok(g)
}

async fn list_groups(State(s): State<Arc<AppState>>) -> Response {
    let list: Vec<GroupData> = s
        .store
        .read(|st| st.cloud_init_groups.values().cloned().collect());
    json(StatusCode::OK, &list)
}

async fn post_group(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let g = check_group(json_body(&body)?)?;
    s.store.write(|st| {
        if st.cloud_init_groups.contains_key(&g.name) {
            return Err(ApiError::conflict(format!(
                "group {} already exists: use PUT to replace it",
                g.name
            )));
        }
        st.cloud_init_groups.insert(g.name.clone(), g);
        Ok(())
    })?;
    Ok(StatusCode::CREATED.into_response())
}

async fn get_group(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name = group_name(&name)?;
    s.store
        .read(|st| st.cloud_init_groups.get(&name).cloned())
        .map(|g| json(StatusCode::OK, &g))
        .ok_or_else(|| ApiError::not_found(format!("no such group: {name}")))
}

async fn put_group(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let name = group_name(&name)?;
    let mut g: GroupData = json_body(&body)?;
    if g.name.is_empty() {
        g.name = name.clone();
    }
    let g = check_group(g)?;
    if g.name != name {
        return Err(ApiError::bad("name", "does not match the name in the URL"));
    }
    s.store.write(|st| {
        st.cloud_init_groups.insert(name, g);
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::OK)
}

async fn delete_group(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = group_name(&name)?;
    s.store.write(|st| {
        st.cloud_init_groups
            .remove(&name)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("no such group: {name}")))
    })?;
    Ok(StatusCode::OK)
}
