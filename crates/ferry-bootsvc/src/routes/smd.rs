//! `/hsm/v2`: the inventory, as SMD serves it. Components by xname,
//! EthernetInterfaces by MAC, groups by label; answers and errors in SMD's
//! shapes.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;

use super::{json, json_body, pairs, values};
use crate::error::ApiError;
use crate::ids::{self, now_unix, rfc3339};
use crate::types::{
    Component, ComponentArray, ComponentPut, EthernetInterface, EthernetInterfacePatch, Group,
    MemberAdd, Members, Message, ResourceUri,
};
use crate::AppState;

const BASE: &str = "/hsm/v2";
const IFACES: &str = "/hsm/v2/Inventory/EthernetInterfaces";

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/hsm/v2/service/ready", get(ready))
        .route("/hsm/v2/service/liveness", get(liveness))
        .route(
            "/hsm/v2/State/Components",
            get(list_components)
                .post(post_components)
                .delete(delete_components),
        )
        .route(
            "/hsm/v2/State/Components/{xname}",
            get(get_component)
                .put(put_component)
                .delete(delete_component),
        )
        .route(
            "/hsm/v2/Inventory/EthernetInterfaces",
            get(list_interfaces)
                .post(post_interface)
                .delete(delete_interfaces),
        )
        .route(
            "/hsm/v2/Inventory/EthernetInterfaces/{id}",
            get(get_interface)
                .patch(patch_interface)
                .delete(delete_interface),
        )
        .route("/hsm/v2/groups", get(list_groups).post(post_group))
        .route(
            "/hsm/v2/groups/{label}",
            get(get_group).delete(delete_group),
        )
        .route(
            "/hsm/v2/groups/{label}/members",
            get(get_members).post(post_member),
        )
        .route("/hsm/v2/groups/{label}/members/{id}", delete(delete_member))
}

fn message(text: impl Into<String>) -> Response {
    json(
        StatusCode::OK,
        &Message {
            code: 0,
            message: text.into(),
        },
    )
}

fn created(uri: String, body: &impl serde::Serialize) -> Response {
    let mut r = json(StatusCode::CREATED, body);
    if let Ok(v) = HeaderValue::from_str(&uri) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn deleted(n: usize) -> Response {
    message(if n == 1 {
        "deleted 1 entry".to_string()
    } else {
        format!("deleted {n} entries")
    })
}

async fn ready() -> Response {
    message("HSM is healthy")
}

async fn liveness() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// A normalised xname from a path or a field, or a 400 naming `field`.
fn xname(field: &str, text: &str) -> Result<ids::Xname, ApiError> {
    ids::parse_xname(text).map_err(|e| ApiError::bad(field, e))
}

/// A component as stored: normalised ID, type from the xname, and SMD's
/// defaults for what is left out.
fn normalise(mut c: Component, field: &str) -> Result<Component, ApiError> {
    let x = xname(&format!("{field}.ID"), &c.id)?;
    c.id = x.id;
    if c.kind.is_empty() {
        c.kind = x.kind.to_string();
    }
    if c.state.is_empty() {
        c.state = "Ready".into();
    }
    if c.flag.is_empty() {
        c.flag = "OK".into();
    }
    if c.enabled.is_none() {
        c.enabled = Some(true);
    }
    if c.role.is_empty() && c.kind == "Node" {
        c.role = "Compute".into();
    }
    if c.arch.is_empty() && c.kind == "Node" {
        c.arch = "X86".into();
    }
    Ok(c)
}

fn matches_any(wanted: &[String], value: &str) -> bool {
    wanted.is_empty() || wanted.iter().any(|w| w.eq_ignore_ascii_case(value))
}

async fn list_components(State(s): State<Arc<AppState>>, RawQuery(q): RawQuery) -> Response {
    let p = pairs(q.as_deref());
    let ids: Vec<String> = values(&p, "id")
        .iter()
        .map(|i| {
            ids::parse_xname(i)
                .map(|x| x.id)
                .unwrap_or_else(|_| i.clone())
        })
        .collect();
    let (kinds, states, roles, subroles, flags, arches) = (
        values(&p, "type"),
        values(&p, "state"),
        values(&p, "role"),
        values(&p, "subrole"),
        values(&p, "flag"),
        values(&p, "arch"),
    );
    let enabled = values(&p, "enabled");
    let nids: Vec<i64> = match values(&p, "nid")
        .iter()
        .map(|n| n.parse::<i64>())
        .collect::<Result<_, _>>()
    {
        Ok(n) => n,
        Err(e) => return ApiError::bad("nid", e).into_response(),
    };
    let components = s.store.read(|st| {
        st.components
            .values()
            .filter(|c| ids.is_empty() || ids.contains(&c.id))
            .filter(|c| matches_any(&kinds, &c.kind))
            .filter(|c| matches_any(&states, &c.state))
            .filter(|c| matches_any(&roles, &c.role))
            .filter(|c| matches_any(&subroles, &c.sub_role))
            .filter(|c| matches_any(&flags, &c.flag))
            .filter(|c| matches_any(&arches, &c.arch))
            .filter(|c| matches_any(&enabled, &c.enabled.unwrap_or(true).to_string()))
            .filter(|c| nids.is_empty() || c.nid.is_some_and(|n| nids.contains(&n)))
            .cloned()
            .collect()
    });
    json(
        StatusCode::OK,
        &ComponentArray {
            components,
            force: false,
        },
    )
}

async fn post_components(
    State(s): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let arr: ComponentArray = json_body(&body)?;
    if arr.components.is_empty() {
        return Err(ApiError::bad("Components", "missing or empty"));
    }
    let comps = arr
        .components
        .into_iter()
        .enumerate()
        .map(|(i, c)| normalise(c, &format!("Components[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    s.store.write(|st| {
        for c in comps {
            st.components.insert(c.id.clone(), c);
        }
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_components(State(s): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let n = s.store.write(|st| {
        let n = st.components.len();
        st.components.clear();
        Ok::<_, ApiError>(n)
    })?;
    Ok(deleted(n))
}

async fn get_component(
    State(s): State<Arc<AppState>>,
    Path(x): Path<String>,
) -> Result<Response, ApiError> {
    let x = xname("xname", &x)?;
    s.store
        .read(|st| st.components.get(&x.id).cloned())
        .map(|c| json(StatusCode::OK, &c))
        .ok_or_else(|| ApiError::not_found(format!("no such component: {}", x.id)))
}

async fn put_component(
    State(s): State<Arc<AppState>>,
    Path(x): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let x = xname("xname", &x)?;
    let mut put: ComponentPut = json_body(&body)?;
    if put.component.id.is_empty() {
        put.component.id = x.id.clone();
    } else if xname("Component.ID", &put.component.id)?.id != x.id {
        return Err(ApiError::bad(
            "Component.ID",
            "does not match the xname in the URL",
        ));
    }
    let c = normalise(put.component, "Component")?;
    s.store.write(|st| {
        st.components.insert(c.id.clone(), c);
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_component(
    State(s): State<Arc<AppState>>,
    Path(x): Path<String>,
) -> Result<Response, ApiError> {
    let x = xname("xname", &x)?;
    s.store.write(|st| {
        st.components
            .remove(&x.id)
            .ok_or_else(|| ApiError::not_found(format!("no such component: {}", x.id)))
    })?;
    Ok(deleted(1))
}

/// A MAC from a field, normalised, or a 400 naming the field.
fn mac(field: &str, text: &str) -> Result<String, ApiError> {
    ids::parse_mac(text).map_err(|e| ApiError::bad(field, e))
}

fn check_ips(iface: &EthernetInterface) -> Result<(), ApiError> {
    for (i, a) in iface.ip_addresses.iter().enumerate() {
        a.ip_address.parse::<IpAddr>().map_err(|_| {
            ApiError::bad(
                &format!("IPAddresses[{i}].IPAddress"),
                format!("'{}' is not an IP address", a.ip_address),
            )
        })?;
    }
    Ok(())
}

/// The normalised component ID and its type; empty stays empty.
fn component_of(field: &str, id: &str) -> Result<(String, String), ApiError> {
    if id.is_empty() {
        return Ok((String::new(), String::new()));
    }
    let x = xname(field, id)?;
    Ok((x.id, x.kind.to_string()))
}

async fn list_interfaces(
    State(s): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let p = pairs(q.as_deref());
    let macs = values(&p, "MACAddress")
        .iter()
        .map(|m| mac("MACAddress", m))
        .collect::<Result<Vec<_>, _>>()?;
    let comps: Vec<String> = values(&p, "ComponentID")
        .iter()
        .map(|c| {
            ids::parse_xname(c)
                .map(|x| x.id)
                .unwrap_or_else(|_| c.clone())
        })
        .collect();
    let ips = values(&p, "IPAddress");
    let kinds = values(&p, "Type");
    let list: Vec<EthernetInterface> = s.store.read(|st| {
        st.interfaces
            .values()
            .filter(|i| macs.is_empty() || macs.contains(&i.mac_address))
            .filter(|i| comps.is_empty() || comps.contains(&i.component_id))
            .filter(|i| {
                ips.is_empty() || i.ip_addresses.iter().any(|a| ips.contains(&a.ip_address))
            })
            .filter(|i| matches_any(&kinds, &i.kind))
            .cloned()
            .collect()
    });
    Ok(json(StatusCode::OK, &list))
}

async fn post_interface(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let mut iface: EthernetInterface = json_body(&body)?;
    if iface.mac_address.is_empty() {
        return Err(ApiError::bad("MACAddress", "missing"));
    }
    iface.mac_address = mac("MACAddress", &iface.mac_address)?;
    iface.id = ids::interface_id(&iface.mac_address);
    (iface.component_id, iface.kind) = component_of("ComponentID", &iface.component_id)?;
    check_ips(&iface)?;
    iface.last_update = rfc3339(now_unix());
    let uri = format!("{IFACES}/{}", iface.id);
    s.store.write(|st| {
        if st.interfaces.contains_key(&iface.id) {
            return Err(ApiError::conflict(format!(
                "operation would conflict with an existing component ethernet interface that has the same MAC address ({})",
                iface.mac_address
            )));
        }
        st.interfaces.insert(iface.id.clone(), iface);
        Ok(())
    })?;
    Ok(created(uri.clone(), &ResourceUri { uri }))
}

async fn delete_interfaces(State(s): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let n = s.store.write(|st| {
        let n = st.interfaces.len();
        st.interfaces.clear();
        Ok::<_, ApiError>(n)
    })?;
    Ok(deleted(n))
}

/// An interface ID from the path: the MAC in any accepted form.
fn interface_id(id: &str) -> Result<String, ApiError> {
    Ok(ids::interface_id(&mac("id", id)?))
}

async fn get_interface(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = interface_id(&id)?;
    s.store
        .read(|st| st.interfaces.get(&id).cloned())
        .map(|i| json(StatusCode::OK, &i))
        .ok_or_else(|| ApiError::not_found(format!("no such component ethernet interface: {id}")))
}

async fn patch_interface(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = interface_id(&id)?;
    let patch: EthernetInterfacePatch = json_body(&body)?;
    let comp = match &patch.component_id {
        Some(c) => Some(component_of("ComponentID", c)?),
        None => None,
    };
    let updated = s.store.write(|st| {
        let iface = st.interfaces.get_mut(&id).ok_or_else(|| {
            ApiError::not_found(format!("no such component ethernet interface: {id}"))
        })?;
        if let Some(d) = patch.description {
            iface.description = d;
        }
        if let Some((c, kind)) = comp {
            iface.component_id = c;
            iface.kind = kind;
        }
        if let Some(ips) = patch.ip_addresses {
            iface.ip_addresses = ips;
        }
        check_ips(iface)?;
        iface.last_update = rfc3339(now_unix());
        Ok::<_, ApiError>(iface.clone())
    })?;
    Ok(json(StatusCode::OK, &updated))
}

async fn delete_interface(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = interface_id(&id)?;
    s.store.write(|st| {
        st.interfaces.remove(&id).ok_or_else(|| {
            ApiError::not_found(format!("no such component ethernet interface: {id}"))
        })
    })?;
    Ok(deleted(1))
}

/// A group label: lowercase letters, digits, `-`, `_`, `.`, `:`.
pub(crate) fn label(text: &str) -> Result<String, ApiError> {
    let l = text.trim().to_ascii_lowercase();
    if l.is_empty()
        || l.len() > 128
        || !l
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(ApiError::bad(
            "label",
            format!("'{text}' is not a valid group label (letters, digits, - _ . :)"),
        ));
    }
    Ok(l)
}

async fn list_groups(State(s): State<Arc<AppState>>) -> Response {
    let groups: Vec<Group> = s.store.read(|st| st.groups.values().cloned().collect());
    json(StatusCode::OK, &groups)
}

async fn post_group(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let mut g: Group = json_body(&body)?;
    g.label = label(&g.label)?;
    g.members.ids = g
        .members
        .ids
        .iter()
        .enumerate()
        .map(|(i, m)| xname(&format!("members.ids[{i}]"), m).map(|x| x.id))
        .collect::<Result<_, _>>()?;
    g.members.ids.sort();
    g.members.ids.dedup();
    let uri = format!("{BASE}/groups/{}", g.label);
    s.store.write(|st| {
        if st.groups.contains_key(&g.label) {
            return Err(ApiError::conflict(format!(
                "operation would conflict with an existing group: {}",
                g.label
            )));
        }
        st.groups.insert(g.label.clone(), g);
        Ok(())
    })?;
    Ok(created(uri.clone(), &vec![ResourceUri { uri }]))
}

fn no_group(l: &str) -> ApiError {
    ApiError::not_found(format!("no such group: {l}"))
}

async fn get_group(
    State(s): State<Arc<AppState>>,
    Path(l): Path<String>,
) -> Result<Response, ApiError> {
    let l = label(&l)?;
    s.store
        .read(|st| st.groups.get(&l).cloned())
        .map(|g| json(StatusCode::OK, &g))
        .ok_or_else(|| no_group(&l))
}

async fn delete_group(
    State(s): State<Arc<AppState>>,
    Path(l): Path<String>,
) -> Result<Response, ApiError> {
    let l = label(&l)?;
    s.store
        .write(|st| st.groups.remove(&l).ok_or_else(|| no_group(&l)))?;
    Ok(deleted(1))
}

async fn get_members(
    State(s): State<Arc<AppState>>,
    Path(l): Path<String>,
) -> Result<Response, ApiError> {
    let l = label(&l)?;
    s.store
        .read(|st| st.groups.get(&l).map(|g| g.members.clone()))
        .map(|m: Members| json(StatusCode::OK, &m))
        .ok_or_else(|| no_group(&l))
}

async fn post_member(
    State(s): State<Arc<AppState>>,
    Path(l): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let l = label(&l)?;
    let add: MemberAdd = json_body(&body)?;
    let id = xname("id", &add.id)?.id;
    let uri = format!("{BASE}/groups/{l}/members/{id}");
    s.store.write(|st| {
        let g = st.groups.get_mut(&l).ok_or_else(|| no_group(&l))?;
        if g.members.ids.contains(&id) {
            return Err(ApiError::conflict(format!(
                "{id} is already a member of {l}"
            )));
        }
        g.members.ids.push(id.clone());
        g.members.ids.sort();
        Ok(())
    })?;
    Ok(created(uri.clone(), &vec![ResourceUri { uri }]))
}

async fn delete_member(
    State(s): State<Arc<AppState>>,
    Path((l, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let l = label(&l)?;
    let id = xname("id", &id)?.id;
    s.store.write(|st| {
        let g = st.groups.get_mut(&l).ok_or_else(|| no_group(&l))?;
        let before = g.members.ids.len();
        g.members.ids.retain(|m| *m != id);
        if g.members.ids.len() == before {
            return Err(ApiError::not_found(format!("{id} is not a member of {l}")));
        }
        Ok(())
    })?;
    Ok(deleted(1))
}
