//! etcd, for more than one manager: the records live in etcd (v3, through
//! its JSON gateway: `/v3/kv/*`, `/v3/lease/*`), one manager is the leader
//! (it holds a key bound to a lease it keeps alive), and every write the
//! leader makes is a transaction that holds only while that key still
//! names it, so a manager that lost its lease (paused, cut off) can never
//! overwrite what the next leader wrote.
//!
//! Keys: `<prefix>/leader` (the leader's id and API address),
//! `<prefix>/nodes/<name>`, `<prefix>/instances/<name>`; values are the
//! same JSON records as in the embedded store.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd at {endpoints}: {detail}: check --etcd and that etcd runs")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        detail: String,
    },
    /// etcd answered with an error or something unreadable.
    #[error("etcd {path}: {detail}")]
    Answer {
        /// The call.
        path: String,
        /// What it said.
        detail: String,
    },
    /// This manager is no longer the leader: another one took over.
    #[error("this manager lost its leadership (its lease expired or another manager holds the leader key)")]
    NotLeader,
}

/// A client for etcd's JSON gateway, trying each endpoint in turn.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// Every key starts with it.
    pub prefix: String,
}

/// One key and its value.
#[derive(Debug, Clone)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
}

/// Where this manager stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderValue {
    /// The manager's random id.
    pub id: String,
    /// Its API address, for followers to point clients at.
    pub api: String,
    /// The URL clients reach its API at (`--api-url`): followers redirect
    /// API requests there. Absent from older managers, or when it listens
    /// on an unspecified address without `--api-url`: followers answer
    /// 503 naming `api` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl Etcd {
    /// A client for `endpoints` (`http://HOST:2379`, comma-separated).
    pub fn new(endpoints: &str, prefix: &str) -> Etcd {
        Etcd {
            endpoints: endpoints
                .split(',')
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .filter(|e| !e.is_empty())
                .collect(),
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_connect(Some(Duration::from_secs(2)))
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build(),
            ),
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let mut last = String::from("no endpoint given");
        for e in &self.endpoints {
            let url = format!("{e}{path}");
            match self.agent.post(&url).send_json(body) {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    if status != 200 {
                        return Err(EtcdError::Answer {
                            path: path.into(),
                            detail: format!("{status}: {text}"),
                        });
                    }
                    return serde_json::from_str(&text).map_err(|e| EtcdError::Answer {
                        path: path.into(),
                        detail: e.to_string(),
                    });
                }
                Err(err) => last = format!("{url}: {err}"),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(","),
            detail: last,
        })
    }

    /// The full key for `rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// Every key under `dir/` (a full key).
    pub fn list(&self, dir: &str) -> Result<Vec<Kv>, EtcdError> {
        let start = format!("{dir}/");
        let end = format!("{dir}0"); // '/' + 1
        let v = self.call(
            "/v3/kv/range",
            &json!({"key": B64.encode(&start), "range_end": B64.encode(&end)}),
        )?;
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        kvs.iter()
            .map(|kv| {
                let key = decode(&kv["key"])?;
                Ok(Kv {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    value: decode(&kv["value"])?,
                })
            })
            .collect()
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let v = self.call("/v3/kv/range", &json!({"key": B64.encode(key)}))?;
        match v["kvs"].as_array().and_then(|a| a.first()) {
            Some(kv) => Ok(Some(decode(&kv["value"])?)),
            None => Ok(None),
        }
    }

    /// Puts (or, with `None`, deletes) `key`, only while `fence` (the leader
    /// key) holds `fence_value`.
    pub fn fenced_write(
        &self,
        fence: &str,
        fence_value: &[u8],
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), EtcdError> {
        let op = match value {
            Some(v) => json!({"request_put": {"key": B64.encode(key), "value": B64.encode(v)}}),
            None => json!({"request_delete_range": {"key": B64.encode(key)}}),
        };
        let v = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [{"key": B64.encode(fence), "result": "EQUAL", "target": "VALUE", "value": B64.encode(fence_value)}],
                "success": [op],
            }),
        )?;
        if v["succeeded"].as_bool() == Some(true) {
            Ok(())
        } else {
            Err(EtcdError::NotLeader)
        }
    }

    /// A lease of `ttl_s` seconds; its id.
    pub fn grant(&self, ttl_s: u64) -> Result<String, EtcdError> {
        let v = self.call("/v3/lease/grant", &json!({"TTL": ttl_s.to_string()}))?;
        v["ID"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| EtcdError::Answer {
                path: "/v3/lease/grant".into(),
                detail: format!("no lease id in {v}"),
            })
    }

    /// Keeps lease `id` alive once; false if it has expired.
    pub fn keep_alive(&self, id: &str) -> Result<bool, EtcdError> {
        let v = self.call("/v3/lease/keepalive", &json!({"ID": id}))?;
        let ttl = v["result"]["TTL"]
            .as_str()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or(0);
        Ok(ttl > 0)
    }

    /// Creates `key` = `value` bound to lease `lease`, if `key` does not
    /// exist; true if this call created it.
    pub fn create_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: &str,
    ) -> Result<bool, EtcdError> {
        let v = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [{"key": B64.encode(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
                "success": [{"request_put": {"key": B64.encode(key), "value": B64.encode(value), "lease": lease}}],
            }),
        )?;
        Ok(v["succeeded"].as_bool() == Some(true))
    }
}

fn decode(v: &Value) -> Result<Vec<u8>, EtcdError> {
    // An empty value is left out of etcd's answer.
    let s = v.as_str().unwrap_or("");
    B64.decode(s).map_err(|e| EtcdError::Answer {
        path: "decode".into(),
        detail: e.to_string(),
    })
}
