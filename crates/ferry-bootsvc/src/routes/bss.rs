//! `/boot/v1`: boot parameters and iPXE boot scripts, as BSS serves them.
//!
//! Parameters are stored one entry per host, MAC or NID (as BSS keys
//! them), and listed grouped again: entries with the same kernel, initrd,
//! params and cloud-init data come back as one object.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::{json, json_body, pairs, text, values};
use crate::error::ApiError;
use crate::ids;
use crate::model::{self, host_key, is_special_host, mac_key, nid_key, Asked, Node};
use crate::types::{BootParams, BssStatus};
use crate::AppState;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/boot/v1/bootparameters",
            get(list).post(post).put(put).patch(patch).delete(remove),
        )
        .route("/boot/v1/bootscript", get(bootscript))
        .route("/boot/v1/service/status", get(status))
}

async fn status() -> Response {
    json(
        StatusCode::OK,
        &BssStatus {
            bss_status: "running".into(),
        },
    )
}

/// The store keys boot parameters name, validated: hosts are node xnames
/// or BSS's special names, MACs valid MACs.
fn keys(bp: &BootParams) -> Result<Vec<String>, ApiError> {
    match &bp.cloud_init.user_data {
        None
        | Some(serde_json::Value::Null)
        | Some(serde_json::Value::String(_))
        | Some(serde_json::Value::Object(_)) => {}
        Some(_) => {
            return Err(ApiError::bad(
                "cloud-init.user-data",
                "must be an object (rendered as #cloud-config) or a string (the document itself)",
            ))
        }
    }
    let mut keys = Vec::new();
    for (i, h) in bp.hosts.iter().enumerate() {
        if is_special_host(h) {
            keys.push(host_key(h));
            continue;
        }
        let x = ids::parse_xname(h).map_err(|e| ApiError::bad(&format!("hosts[{i}]"), e))?;
        if x.kind != "Node" {
            return Err(ApiError::bad(
                &format!("hosts[{i}]"),
                format!("'{h}' is a {}, not a node", x.kind),
            ));
        }
        keys.push(host_key(&x.id));
    }
    for (i, m) in bp.macs.iter().enumerate() {
        let m = ids::parse_mac(m).map_err(|e| ApiError::bad(&format!("macs[{i}]"), e))?;
        keys.push(mac_key(&m));
    }
    for n in &bp.nids {
        keys.push(nid_key(*n));
    }
    if keys.is_empty() {
        return Err(ApiError::bad("hosts, macs, nids", "give at least one"));
    }
    keys.dedup();
    Ok(keys)
}

/// The entry stored under `key`: `bp`'s data with only that key.
fn entry(key: &str, bp: &BootParams) -> BootParams {
    let mut e = BootParams {
        params: bp.params.clone(),
        kernel: bp.kernel.clone(),
        initrd: bp.initrd.clone(),
        cloud_init: bp.cloud_init.clone(),
        ..BootParams::default()
    };
    if let Some(h) = key.strip_prefix("host:") {
        e.hosts.push(h.to_string());
    } else if let Some(m) = key.strip_prefix("mac:") {
        e.macs.push(m.to_string());
    } else if let Some(n) = key.strip_prefix("nid:").and_then(|n| n.parse().ok()) {
        e.nids.push(n);
    }
    e
}

/// Entries with the same data merged into one object, as BSS lists them.
fn grouped<'a>(entries: impl Iterator<Item = &'a BootParams>) -> Vec<BootParams> {
    let mut out: Vec<BootParams> = Vec::new();
    for e in entries {
        let same = out.iter_mut().find(|o| {
            o.params == e.params
                && o.kernel == e.kernel
                && o.initrd == e.initrd
                && o.cloud_init == e.cloud_init
        });
        match same {
            Some(o) => {
                o.hosts.extend(e.hosts.iter().cloned());
                o.macs.extend(e.macs.iter().cloned());
                o.nids.extend(e.nids.iter().copied());
            }
            None => out.push(e.clone()),
        }
    }
    out
}

async fn list(State(s): State<Arc<AppState>>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let p = pairs(q.as_deref());
    let mut wanted = Vec::new();
    for m in values(&p, "mac") {
        wanted.push(mac_key(
            &ids::parse_mac(&m).map_err(|e| ApiError::bad("mac", e))?,
        ));
    }
    for n in values(&p, "name") {
        let n = ids::parse_xname(&n).map(|x| x.id).unwrap_or(n);
        wanted.push(host_key(&n));
    }
    for n in values(&p, "nid") {
        let n: i64 = n.parse().map_err(|e| ApiError::bad("nid", e))?;
        wanted.push(nid_key(n));
    }
    let found = s.store.read(|st| {
        if wanted.is_empty() {
            grouped(st.boot.values())
        } else {
            grouped(wanted.iter().filter_map(|k| st.boot.get(k)))
        }
    });
    if !wanted.is_empty() && found.is_empty() {
        return Err(ApiError::not_found(
            "no boot parameters for the given mac, name or nid",
        ));
    }
    Ok(json(StatusCode::OK, &found))
}

/// POST: creates; boot parameters already there for any key are a 409.
async fn post(State(s): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, ApiError> {
    let bp: BootParams = json_body(&body)?;
    let keys = keys(&bp)?;
    s.store.write(|st| {
        if let Some(k) = keys.iter().find(|k| st.boot.contains_key(*k)) {
            return Err(ApiError::conflict(format!(
                "boot parameters for {k} already exist: use PUT to replace or PATCH to change them"
            )));
        }
        for k in &keys {
            st.boot.insert(k.clone(), entry(k, &bp));
        }
        Ok(())
    })?;
    Ok(StatusCode::CREATED)
}

/// PUT: creates or replaces.
async fn put(State(s): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, ApiError> {
    let bp: BootParams = json_body(&body)?;
    let keys = keys(&bp)?;
    s.store.write(|st| {
        for k in &keys {
            st.boot.insert(k.clone(), entry(k, &bp));
        }
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::OK)
}

/// PATCH: changes what is given of existing entries.
async fn patch(State(s): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, ApiError> {
    let bp: BootParams = json_body(&body)?;
    let keys = keys(&bp)?;
    s.store.write(|st| {
        for k in &keys {
            let e = st
                .boot
                .get_mut(k)
                .ok_or_else(|| ApiError::not_found(format!("no boot parameters for {k}")))?;
            if !bp.params.is_empty() {
                e.params = bp.params.clone();
            }
            if !bp.kernel.is_empty() {
                e.kernel = bp.kernel.clone();
            }
            if !bp.initrd.is_empty() {
                e.initrd = bp.initrd.clone();
            }
            if bp.cloud_init.meta_data.is_some() {
                e.cloud_init.meta_data = bp.cloud_init.meta_data.clone();
            }
            if bp.cloud_init.user_data.is_some() {
                e.cloud_init.user_data = bp.cloud_init.user_data.clone();
            }
        }
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::OK)
}

async fn remove(State(s): State<Arc<AppState>>, body: Bytes) -> Result<StatusCode, ApiError> {
    let bp: BootParams = json_body(&body)?;
    let keys = keys(&bp)?;
    s.store.write(|st| {
        let before = st.boot.len();
        for k in &keys {
            st.boot.remove(k);
        }
        if st.boot.len() == before {
            return Err(ApiError::not_found(
                "no boot parameters for the given hosts, macs or nids",
            ));
        }
        Ok(())
    })?;
    Ok(StatusCode::OK)
}

async fn bootscript(
    State(s): State<Arc<AppState>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let p = pairs(q.as_deref());
    let first = |k: &str| values(&p, k).into_iter().next();
    let asked = if let Some(m) = first("mac") {
        Asked::Mac(ids::parse_mac(&m).map_err(|e| ApiError::bad("mac", e))?)
    } else if let Some(n) = first("name") {
        Asked::Name(ids::parse_xname(&n).map(|x| x.id).unwrap_or(n))
    } else if let Some(n) = first("nid") {
        Asked::Nid(n.parse().map_err(|e| ApiError::bad("nid", e))?)
    } else {
        return Err(ApiError::bad(
            "query",
            "need a mac=, name= or nid= parameter",
        ));
    };
    let arch = first("arch").unwrap_or_else(|| "x86_64".into());
    let retry: u32 = first("retry").and_then(|r| r.parse().ok()).unwrap_or(0);
    let want_json = first("json").is_some_and(|j| j != "0");
    let descr = match &asked {
        Asked::Mac(m) => format!("MAC {m}"),
        Asked::Name(n) => n.clone(),
        Asked::Nid(n) => format!("NID {n}"),
    };
    let advertise = &s.advertise;
    let (bp, node) = s.store.read(|st| {
        let (bp, node) = st.boot_for(&asked);
        let bp = bp.filter(|b| !b.kernel.is_empty()).cloned();
        match (bp, node) {
            (Some(bp), node) => Ok((bp, node)),
            (None, Some(node)) => Err(ApiError::not_found(format!(
                "{descr}{}: this host is not configured for booting",
                node.xname().map(|x| format!(" ({x})")).unwrap_or_default()
            ))),
            (None, None) => {
                let unknown = format!("Unknown-{arch}");
                match st.boot.get(&host_key(&unknown)).filter(|b| !b.kernel.is_empty()) {
                    Some(bp) => Ok((
                        bp.clone(),
                        Some(Node {
                            component: None,
                            mac: match &asked {
                                Asked::Mac(m) => Some(m.clone()),
                                _ => None,
                            },
                        }),
                    )),
                    None => Err(ApiError::not_found(format!(
                        "unknown {descr}: no component or boot parameters know it, and there are none for {unknown}"
                    ))),
                }
            }
        }
    })?;
    if want_json {
        return Ok(json(
            StatusCode::OK,
            &model::boot_data(&bp, node.as_ref(), advertise),
        ));
    }
    let again = match (&asked, node.as_ref().and_then(|n| n.mac.as_deref())) {
        (_, Some(m)) => format!("mac={m}"),
        (Asked::Name(n), None) => format!("name={n}"),
        (Asked::Nid(n), None) => format!("nid={n}"),
        (Asked::Mac(m), None) => format!("mac={m}"),
    };
    let chain = format!("{advertise}/boot/v1/bootscript?{again}&retry={}", retry + 1);
    Ok(text(
        "text/plain; charset=UTF-8",
        model::boot_script(&bp, node.as_ref(), advertise, &chain),
    ))
}
