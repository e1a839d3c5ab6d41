//! The routes. See `docs/web.md` for the API as users see it.
//!
//! Calls to other members run in parallel (at most [`MAX_PARALLEL`] at a
//! time), each within the `--timeout-ms` limit, so a fleet with dead
//! members still answers in about one timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_agent_proto::FleetFile;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::Options;
use crate::error::ApiError;
use crate::fleet;
use crate::http::{self, Request, Response};
use crate::storage::{self, Store};

/// Most calls to other members in flight at once for one request.
const MAX_PARALLEL: usize = 16;

/// What every request needs.
pub struct Service {
    options: Options,
    store: Store,
}

impl Service {
    /// A service with its options and open store.
    pub fn new(options: Options, store: Store) -> Self {
        Self { options, store }
    }

    /// Answers one request; never panics on bad input.
    pub fn handle(&self, request: &Request) -> Response {
        match self.route(request) {
            Ok(response) => response,
            Err(e) => {
                let mut response = Response::error(e.status(), &e.to_string());
                if let ApiError::MethodNotAllowed { allow, .. } = &e {
                    response.headers.push(("Allow", (*allow).to_owned()));
                }
                if response.status >= 500 {
                    info!("{} {}: {e}", request.method, request.path);
                }
                response
            }
        }
    }

    fn route(&self, request: &Request) -> Result<Response, ApiError> {
        let method = request.method.as_str();
        let path = request.path.as_str();
        let only = |allow: &'static str| {
            if allow.split(", ").any(|m| m == method) {
                Ok(())
            } else {
                Err(ApiError::MethodNotAllowed {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    allow,
                })
            }
        };
        if let Some(key) = path.strip_prefix("/storage/") {
            only("GET, POST, DELETE")?;
            return self.storage(method, key, &request.body);
        }
        if let Some(vm) = path.strip_prefix("/ping/") {
            only("GET")?;
            return self.ping(vm);
        }
        match path {
            "/health" => only("GET").map(|()| self.health()),
            "/info" => only("GET").and_then(|()| self.info()),
            "/broadcast" => only("POST").and_then(|()| self.broadcast(&request.body)),
            "/cluster-status" => only("GET").and_then(|()| self.cluster_status()),
            _ => Err(ApiError::NotFound(format!(
                "no route {path}: try /health, /info, /storage/KEY, /ping/VM, /broadcast, /cluster-status"
            ))),
        }
    }

    /// The fleet file, or an empty fleet named after this instance while
    /// there is none.
    fn fleet(&self) -> Result<FleetFile, ApiError> {
        Ok(
            fleet::read(&self.options.fleet_file)?.unwrap_or_else(|| FleetFile {
                self_name: self.fallback_name(),
                members: BTreeMap::new(),
                updated_unix: 0,
            }),
        )
    }

    /// The name when the fleet file gives none: `--name`, else the hostname.
    fn fallback_name(&self) -> String {
        self.options
            .name
            .clone()
            .or_else(hostname)
            .unwrap_or_else(|| "ferry-web".to_owned())
    }

    /// This instance's name: the fleet's `self`, else [`Self::fallback_name`].
    /// A broken fleet file does not stop `/health` from answering.
    fn name(&self) -> String {
        match fleet::read(&self.options.fleet_file) {
            Ok(Some(fleet)) => fleet.self_name,
            _ => self.fallback_name(),
        }
    }

    fn health(&self) -> Response {
        Response::json(200, &json!({"status": "ok", "name": self.name()}))
    }

    fn info(&self) -> Result<Response, ApiError> {
        let (fleet, fleet_error) = match fleet::read(&self.options.fleet_file) {
            Ok(fleet) => (fleet, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut fleet_json = json!({
            "file": self.options.fleet_file,
            "members": fleet.as_ref().map(|f| f.members.clone()).unwrap_or_default(),
            "updated_unix": fleet.as_ref().map(|f| f.updated_unix),
        });
        if let Some(e) = fleet_error {
            fleet_json["error"] = json!(e);
        }
        let name = fleet
            .map(|f| f.self_name)
            .unwrap_or_else(|| self.fallback_name());
        Ok(Response::json(
            200,
            &json!({
                "name": name,
                "hostname": hostname(),
                "uptime_s": uptime_s(),
                "boot_id": boot_id(),
                "fleet": fleet_json,
                "storage_keys": self.store.count()?,
                "version": env!("CARGO_PKG_VERSION"),
            }),
        ))
    }

    fn storage(&self, method: &str, key: &str, body: &[u8]) -> Result<Response, ApiError> {
        match method {
            "GET" => Ok(Response::bytes(200, self.store.get(key)?)),
            "POST" => {
                let created = self.store.put(key, body)?;
                Ok(Response::json(
                    if created { 201 } else { 200 },
                    &json!({"key": key, "bytes": body.len(), "created": created}),
                ))
            }
            _ => {
                self.store.delete(key)?;
                Ok(Response::json(200, &json!({"key": key, "deleted": true})))
            }
        }
    }

    fn ping(&self, vm: &str) -> Result<Response, ApiError> {
        let fleet = self.fleet()?;
        let Some(addr_text) = fleet.members.get(vm) else {
            let known: Vec<&str> = fleet.members.keys().map(String::as_str).collect();
            return Err(ApiError::NotFound(format!(
                "no VM '{vm}' in the fleet (members: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        };
        let addr = fleet::address(vm, addr_text)?;
        let (answer, latency) = health_of(addr, self.options.timeout)
            .map_err(|e| ApiError::Upstream(format!("ping {vm}: {e}")))?;
        Ok(Response::json(
            200,
            &json!({"vm": vm, "addr": addr, "latency_ms": ms(latency), "answer": answer}),
        ))
    }

    fn broadcast(&self, body: &[u8]) -> Result<Response, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Broadcast {
            key: String,
            value: String,
        }
        let Broadcast { key, value } = serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body must be JSON {{\"key\": \"...\", \"value\": \"...\"}} (value a string): {e}"
            ))
        })?;
        storage::check_key(&key)?;
        if value.len() > storage::MAX_VALUE {
            return Err(storage::StorageError::TooLarge(value.len()).into());
        }
        let fleet = self.fleet()?;
        // Every member, and this instance even when the list leaves it out.
        let mut targets: Vec<(String, Option<String>)> = fleet
            .members
            .iter()
            .map(|(name, addr)| (name.clone(), Some(addr.clone())))
            .collect();
        if !fleet.members.contains_key(&fleet.self_name) {
            targets.push((fleet.self_name.clone(), None));
        }
        let path = format!("/storage/{key}");
        let results = parallel(&targets, |(name, addr)| {
            // Itself: straight to its own disk, so that a broadcast needs no
            // route to its own exposed port.
            if *name == fleet.self_name {
                return match self.store.put(&key, value.as_bytes()) {
                    Ok(_) => json!({"ok": true, "local": true}),
                    Err(e) => json!({"ok": false, "error": e.to_string()}),
                };
            }
            let addr = match fleet::address(name, addr.as_deref().unwrap_or_default()) {
                Ok(addr) => addr,
                Err(e) => return json!({"ok": false, "error": e.to_string()}),
            };
            let started = Instant::now();
            match http::call(
                addr,
                "POST",
                &path,
                Some(value.as_bytes()),
                self.options.timeout,
            ) {
                Ok(a) if matches!(a.status, 200 | 201) => json!({
                    "ok": true,
                    "addr": addr,
                    "status": a.status,
                    "latency_ms": ms(started.elapsed()),
                }),
                Ok(a) => json!({
                    "ok": false,
                    "addr": addr,
                    "status": a.status,
                    "error": format!("{addr} answered HTTP {}: {}", a.status, body_text(&a.body)),
                }),
                Err(e) => json!({"ok": false, "addr": addr, "error": e.to_string()}),
            }
        });
        let failed = results.iter().filter(|r| r["ok"] != json!(true)).count();
        let by_name: BTreeMap<&str, Value> = targets
            .iter()
            .map(|(name, _)| name.as_str())
            .zip(results)
            .collect();
        Ok(Response::json(
            if failed == 0 { 200 } else { 502 },
            &json!({
                "key": key,
                "stored": by_name.len() - failed,
                "failed": failed,
                "results": by_name,
            }),
        ))
    }

    fn cluster_status(&self) -> Result<Response, ApiError> {
        let fleet = self.fleet()?;
        let members: Vec<(&String, &String)> = fleet.members.iter().collect();
        let probes = parallel(&members, |(name, addr)| {
            let mut entry = json!({"name": name, "addr": addr});
            let outcome = fleet::address(name, addr)
                .map_err(|e| e.to_string())
                .and_then(|a| health_of(a, self.options.timeout));
            match outcome {
                Ok((answer, latency)) => {
                    entry["reachable"] = json!(true);
                    entry["latency_ms"] = json!(ms(latency));
                    entry["health_name"] = answer["name"].clone();
                }
                Err(e) => {
                    entry["reachable"] = json!(false);
                    entry["latency_ms"] = Value::Null;
                    entry["health_name"] = Value::Null;
                    entry["error"] = json!(e);
                }
            }
            entry
        });
        let reachable = probes
            .iter()
            .filter(|p| p["reachable"] == json!(true))
            .count();
        Ok(Response::json(
            200,
            &json!({
                "self": {
                    "name": fleet.self_name,
                    "hostname": hostname(),
                    "storage_keys": self.store.count()?,
                },
                "members": probes,
                "reachable": reachable,
                "total": members.len(),
            }),
        ))
    }
}

/// `GET /health` of a member: its JSON answer and how long it took.
fn health_of(addr: SocketAddr, timeout: Duration) -> Result<(Value, Duration), String> {
    let started = Instant::now();
    let answer = http::call(addr, "GET", "/health", None, timeout).map_err(|e| e.to_string())?;
    let latency = started.elapsed();
    if answer.status != 200 {
        return Err(format!(
            "{addr} answered HTTP {} to /health: {}",
            answer.status,
            body_text(&answer.body)
        ));
    }
    let value: Value = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("{addr} answered /health with something that is not JSON: {e}"))?;
    Ok((value, latency))
}

/// Milliseconds with microsecond precision, for JSON.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// The start of a body, for error messages.
fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}...", text.chars().take(200).collect::<String>())
    } else {
        text.to_owned()
    }
}

/// Runs `f` on every item, at most [`MAX_PARALLEL`] at a time; results in
/// the items' order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new(items.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..items.len().min(MAX_PARALLEL) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was handled"))
        .collect()
}

/// The kernel's hostname (read from `/proc`, no NSS).
fn hostname() -> Option<String> {
    read_trimmed("/proc/sys/kernel/hostname")
}

/// Seconds since the kernel booted.
fn uptime_s() -> Option<f64> {
    read_trimmed("/proc/uptime")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The kernel's boot id: new on every boot, the same in a resumed snapshot.
fn boot_id() -> Option<String> {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(tag: &str) -> (Service, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ferry-web-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = Options {
            fleet_file: dir.join("fleet.json"),
            storage_dir: dir.join("store"),
            name: Some("solo".into()),
            timeout: Duration::from_millis(300),
            ..Options::default()
        };
        let store = Store::open(&options.storage_dir).unwrap();
        (Service::new(options, store), dir)
    }

    fn req(method: &str, path: &str, body: &[u8]) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.to_vec(),
        }
    }

    fn json_of(r: &Response) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn routes_and_errors() {
        let (s, dir) = service("routes");
        let r = s.handle(&req("GET", "/health", b""));
        assert_eq!(
            (r.status, json_of(&r)),
            (200, json!({"status": "ok", "name": "solo"}))
        );
        let r = s.handle(&req("PUT", "/storage/k", b"v"));
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, vec![("Allow", "GET, POST, DELETE".to_owned())]);
        assert_eq!(s.handle(&req("GET", "/nope", b"")).status, 404);
        assert_eq!(s.handle(&req("GET", "/storage/", b"")).status, 400);
        assert_eq!(s.handle(&req("GET", "/storage/a/b", b"")).status, 400);
        assert_eq!(s.handle(&req("POST", "/broadcast", b"{")).status, 400);
        assert_eq!(
            s.handle(&req("POST", "/broadcast", br#"{"key":"k","value":5}"#))
                .status,
            400
        );
        assert_eq!(s.handle(&req("GET", "/ping/x", b"")).status, 404);
        // No fleet: a broadcast stores on this instance alone.
        let r = s.handle(&req("POST", "/broadcast", br#"{"key":"k","value":"v"}"#));
        assert_eq!(r.status, 200, "{}", json_of(&r));
        assert_eq!(json_of(&r)["results"]["solo"]["ok"], json!(true));
        assert_eq!(s.handle(&req("GET", "/storage/k", b"")).body, b"v");
        // A broken fleet file: /health still answers, fleet routes say why.
        std::fs::write(dir.join("fleet.json"), "not json").unwrap();
        assert_eq!(s.handle(&req("GET", "/health", b"")).status, 200);
        let r = s.handle(&req("GET", "/cluster-status", b""));
        assert_eq!(r.status, 500);
        assert!(json_of(&r)["error"]
            .as_str()
            .unwrap()
            .contains("fleet.json is not valid"));
        let info = json_of(&s.handle(&req("GET", "/info", b"")));
        assert!(info["fleet"]["error"].is_string(), "{info}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parallel_keeps_order() {
        let items: Vec<u32> = (0..40).collect();
        assert_eq!(
            parallel(&items, |i| i * 2),
            (0..40).map(|i| i * 2).collect::<Vec<_>>()
        );
        assert!(parallel(&[] as &[u32], |i| *i).is_empty());
    }
}
