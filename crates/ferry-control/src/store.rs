//! Where the manager keeps what it knows, so that a restarted manager
//! (killed, upgraded, moved) serves the same nodes and instances: by
//! default an embedded database ([redb](https://docs.rs/redb)) in
//! `--store DIR`, where each change is one durable transaction, written
//! beside the old state and switched to atomically by redb (a crash
//! mid-write leaves the last good state); or, for several managers, etcd
//! ([`crate::etcd`]), where every write is fenced by the leader key.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::api::{Instance, Node};

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes.v1");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances.v1");

/// A node, and what only the manager knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What the API shows.
    #[serde(flatten)]
    pub node: Node,
    /// The worker that holds the name.
    pub worker_id: String,
}

/// An instance, and what only the manager knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// What the API shows.
    #[serde(flatten)]
    pub instance: Instance,
    /// Its credential: the peer serving it accepts only this token. Never
    /// shown by the API. Each move replaces it with a fresh one.
    pub token: String,
    /// The fresh credential of a move in flight: the destination serves
    /// the instance with it once it has moved there, and it becomes
    /// `token` then (also when a restarted manager learns of the move from
    /// the heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_token: Option<String>,
    /// Ports asked for, `HOSTPORT:GUESTPORT`, exposed again on each node
    /// it moves to.
    #[serde(default)]
    pub expose: Vec<String>,
}

/// Everything stored.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The nodes.
    pub nodes: Vec<NodeRecord>,
    /// The instances.
    pub instances: Vec<InstanceRecord>,
}

/// The manager's store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or written.
    #[error("the manager's store {path}: {detail}")]
    Database {
        /// The store's file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// etcd failed, or this manager is no longer the leader.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// A record in it is not readable (written by a newer manager?).
    #[error("the manager's store {path} holds an unreadable record '{key}': {detail}")]
    Record {
        /// The store's file.
        path: PathBuf,
        /// The record.
        key: String,
        /// Why.
        detail: String,
    },
}

/// The manager's store: embedded, or etcd.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Redb(RedbStore),
    Etcd {
        etcd: crate::etcd::Etcd,
        /// The leader key, and the value that says this manager leads.
        fence: (String, Vec<u8>),
    },
}

impl Store {
    /// Opens (or creates) the embedded store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Redb(RedbStore::open(dir)?),
        })
    }

    /// The records in etcd, written only while the leader key `fence.0`
    /// holds `fence.1` (this manager).
    pub fn etcd(etcd: crate::etcd::Etcd, fence: (String, Vec<u8>)) -> Store {
        Store {
            backend: Backend::Etcd { etcd, fence },
        }
    }

    /// Everything in the store.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.load(),
            Backend::Etcd { etcd, .. } => {
                let mut snap = Snapshot::default();
                let path = PathBuf::from(&etcd.prefix);
                let decode = |kv: &crate::etcd::Kv| StoreError::Record {
                    path: path.clone(),
                    key: kv.key.clone(),
                    detail: "not a record this manager reads".into(),
                };
                for kv in etcd.list(&etcd.key("nodes"))? {
                    snap.nodes
                        .push(serde_json::from_slice(&kv.value).map_err(|_| decode(&kv))?);
                }
                for kv in etcd.list(&etcd.key("instances"))? {
                    snap.instances
                        .push(serde_json::from_slice(&kv.value).map_err(|_| decode(&kv))?);
                }
                Ok(snap)
            }
        }
    }

    /// Writes a node.
    pub fn put_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.put_node(n),
            Backend::Etcd { etcd, fence } => {
                let bytes = serde_json::to_vec(n).expect("a record serialises");
                let key = etcd.key(&format!("nodes/{}", n.node.name));
                Ok(etcd.fenced_write(&fence.0, &fence.1, &key, Some(&bytes))?)
            }
        }
    }

    /// Writes an instance.
    pub fn put_instance(&self, i: &InstanceRecord) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.put_instance(i),
            Backend::Etcd { etcd, fence } => {
                let bytes = serde_json::to_vec(i).expect("a record serialises");
                let key = etcd.key(&format!("instances/{}", i.instance.name));
                Ok(etcd.fenced_write(&fence.0, &fence.1, &key, Some(&bytes))?)
            }
        }
    }

    /// Deletes an instance.
    pub fn delete_instance(&self, name: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.delete_instance(name),
            Backend::Etcd { etcd, fence } => {
                let key = etcd.key(&format!("instances/{name}"));
                Ok(etcd.fenced_write(&fence.0, &fence.1, &key, None)?)
            }
        }
    }
}

/// The embedded store.
struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let path = dir.join("manager.redb");
        let db_err = |e: &dyn std::fmt::Display| StoreError::Database {
            path: path.clone(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| db_err(&e))?;
        let db = Database::create(&path).map_err(|e| db_err(&e))?;
        let store = RedbStore { db, path };
        // Both tables exist from the start, so reads never miss one.
        store.write(|w| {
            w.open_table(NODES).map_err(boxed)?;
            w.open_table(INSTANCES).map_err(boxed)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let err = |e: &dyn std::fmt::Display| self.error(e);
        let r = self.db.begin_read().map_err(|e| err(&e))?;
        let mut snap = Snapshot::default();
        for entry in r
            .open_table(NODES)
            .map_err(|e| err(&e))?
            .iter()
            .map_err(|e| err(&e))?
        {
            let (k, v) = entry.map_err(|e| err(&e))?;
            snap.nodes.push(self.decode(k.value(), v.value())?);
        }
        for entry in r
            .open_table(INSTANCES)
            .map_err(|e| err(&e))?
            .iter()
            .map_err(|e| err(&e))?
        {
            let (k, v) = entry.map_err(|e| err(&e))?;
            snap.instances.push(self.decode(k.value(), v.value())?);
        }
        Ok(snap)
    }

    fn put_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(n).expect("a record serialises");
        self.write(|w| {
            w.open_table(NODES)
                .map_err(boxed)?
                .insert(n.node.name.as_str(), bytes.as_slice())
                .map_err(boxed)?;
            Ok(())
        })
    }

    fn put_instance(&self, i: &InstanceRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(i).expect("a record serialises");
        self.write(|w| {
            w.open_table(INSTANCES)
                .map_err(boxed)?
                .insert(i.instance.name.as_str(), bytes.as_slice())
                .map_err(boxed)?;
            Ok(())
        })
    }

    fn delete_instance(&self, name: &str) -> Result<(), StoreError> {
        self.write(|w| {
            w.open_table(INSTANCES)
                .map_err(boxed)?
                .remove(name)
                .map_err(boxed)?;
            Ok(())
        })
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), Box<redb::Error>>,
    ) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(|e| self.error(&e))?;
        f(&w).map_err(|e| self.error(&e))?;
        w.commit().map_err(|e| self.error(&e))
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Record {
            path: self.path.clone(),
            key: key.to_string(),
            detail: e.to_string(),
        })
    }

    fn error(&self, e: &dyn std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }
}

/// A redb error, boxed (they are large).
fn boxed(e: impl Into<redb::Error>) -> Box<redb::Error> {
    Box::new(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{InstanceState, NodeState};

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeRecord {
            node: Node {
                name: "node-1".into(),
                address: "10.0.0.1".into(),
                state: NodeState::Ready,
                accel: "tcg".into(),
                cpus: 2,
                memory_mib: 1024,
                free_mib: 512,
                last_heartbeat_unix: 1,
                lease_s: 10,
                instances: 0,
            },
            worker_id: "w1".into(),
        };
        let inst = InstanceRecord {
            instance: Instance {
                name: "redis-1".into(),
                source: "http://r/".into(),
                node: "node-1".into(),
                state: InstanceState::Running,
                reason: None,
                address: Some("10.0.0.1:1500".into()),
                exposes: vec![],
                memory_mib: 256,
                moves: vec![],
                created_unix: 1,
                last_error: None,
            },
            token: "t".repeat(32),
            pending_token: None,
            expose: vec!["16379:6379".into()],
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_node(&node).unwrap();
            s.put_instance(&inst).unwrap();
            let mut gone = inst.clone();
            gone.instance.name = "gone".into();
            s.put_instance(&gone).unwrap();
            s.delete_instance("gone").unwrap();
        }
        let snap = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(snap.nodes, vec![node]);
        assert_eq!(snap.instances, vec![inst]);
    }
}
