//! The `Instance` custom resource (`instances.ferry.dev`, `v1alpha1`): the
//! spec a user writes, the status the operator reports, and the CRD's YAML.
//!
//! The schema is generated from these types, so the API server itself
//! refuses an Instance without `packageRaddr`, or with one that is neither
//! `HOST:PORT` nor an `http(s)://` URL, before the operator sees it.

use kube::CustomResource;
use kube::CustomResourceExt;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pattern `spec.packageRaddr` must match: `HOST:PORT` or an
/// `http(s)://` URL.
pub const PACKAGE_RADDR_PATTERN: &str =
    r"^(https?://[A-Za-z0-9.:\[\]-]+(/[^\s]*)?|[A-Za-z0-9.-]+:[0-9]{1,5})$";

/// The pattern of one `spec.exposes` entry: `HOSTPORT:GUESTPORT`.
pub const EXPOSE_PATTERN: &str = r"^[0-9]{1,5}:[0-9]{1,5}$";

/// The CEL rule that keeps `spec.exposes` as it was created (set or
/// unset, and the same list).
pub const EXPOSES_IMMUTABLE: &str = "has(self.exposes) == has(oldSelf.exposes) && (!has(self.exposes) || self.exposes == oldSelf.exposes)";

/// What the API server answers an edit of `spec.exposes`.
pub const EXPOSES_IMMUTABLE_MESSAGE: &str = "spec.exposes is immutable: the VM's ports are set when it is created; delete the Instance and apply it again";

/// What the API server answers an edit of `spec.packageRaddr`.
pub const PACKAGE_RADDR_IMMUTABLE_MESSAGE: &str = "spec.packageRaddr is immutable: the VM was started from it and keeps its own disk and memory since; delete the Instance and apply it again to start from another source";

/// A ferry VM, run by `ferry manager` on the worker `nodeName`; changing
/// `nodeName` live-migrates it there.
///
/// `packageRaddr` and `exposes` are immutable (CEL rules the API server
/// enforces): a VM keeps its disk and memory across moves, and a new
/// source or other ports would need a new VM, which would lose them.
/// Delete the Instance and apply it again to start over.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(EXPOSES_IMMUTABLE).message(EXPOSES_IMMUTABLE_MESSAGE))]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Instance",
    plural = "instances",
    singular = "instance",
    shortname = "fi",
    namespaced,
    status = "InstanceStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.packageLaddr"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// Where to start from: a registry (`HOST:PORT` or an `http(s)://`
    /// URL) serving the VM's package.
    #[schemars(regex(
        pattern = r"^(https?://[A-Za-z0-9.:\[\]-]+(/[^\s]*)?|[A-Za-z0-9.-]+:[0-9]{1,5})$"
    ))]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(PACKAGE_RADDR_IMMUTABLE_MESSAGE))]
    pub package_raddr: String,
    /// The worker (`ferry worker --name`) to run on. Change it to move the
    /// VM there.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Guest memory the VM is expected to have, MiB. The package decides
    /// it; a mismatch is reported in the Ready condition's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16))]
    pub memory: Option<u64>,
    /// Ports to expose on the node's address, `HOSTPORT:GUESTPORT`. They
    /// move with the VM; read `status.exposes` for where they are now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub exposes: Vec<Expose>,
}

/// One exposed port, `HOSTPORT:GUESTPORT`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct Expose(
    #[schemars(regex(pattern = r"^[0-9]{1,5}:[0-9]{1,5}$"), length(max = 11))] pub String,
);

/// What the operator observed, written by server-side apply.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Pending, Starting, Running, Migrating, Failed or Lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// The VM's address (`HOST:PORT`), usable as another Instance's
    /// `packageRaddr` or as a migration source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_laddr: Option<String>,
    /// The node the VM runs on now (differs from `spec.nodeName` until a
    /// move ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Where its exposed ports are now, `HOST:PORT:GUESTPORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposes: Vec<String>,
    /// The manager's name for the VM (`NAMESPACE.NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    /// Ready, Migrating and Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Every move of the VM, oldest first (as the manager records them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<MoveRecord>,
    /// How many times the operator recreated the VM after it failed
    /// (reset once it has run for a while); it gives up after a few.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreations: Option<u32>,
    /// When it last recreated it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recreate_time: Option<String>,
}

/// Where an Instance is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum State {
    /// Not sent to a node yet (e.g. its node is unknown).
    Pending,
    /// Its node is starting it.
    Starting,
    /// It runs on `status.nodeName`.
    Running,
    /// It is moving to `spec.nodeName`.
    Migrating,
    /// It could not be started, or it stopped.
    Failed,
    /// Its node stopped reporting: it may still run there.
    Lost,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A condition, as Kubernetes' `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Migrating` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation it was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One move between nodes (an `InstanceMigration` record).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveRecord {
    /// The node it left.
    pub from: String,
    /// The node it went to.
    pub to: String,
    /// `Running`, `Succeeded` or `Failed`.
    pub phase: String,
    /// When it began (RFC 3339).
    pub start_time: String,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// How long the guest was paused, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Instance {
    /// The condition of `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
    }
}

/// The CRD as YAML (what `ferry operator crd` prints, and
/// `deploy/crd.yaml` holds).
pub fn crd_yaml() -> String {
    serde_yaml_ng::to_string(&Instance::crd()).expect("the CRD serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_requires_and_checks_package_raddr() {
        let crd = serde_json::to_value(Instance::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(required.contains(&"packageRaddr"), "{spec}");
        assert!(required.contains(&"nodeName"), "{spec}");
        assert_eq!(
            spec["properties"]["packageRaddr"]["pattern"],
            PACKAGE_RADDR_PATTERN
        );
        assert_eq!(
            spec["properties"]["exposes"]["items"]["pattern"],
            EXPOSE_PATTERN
        );
        assert_eq!(
            crd["spec"]["versions"][0]["subresources"]["status"],
            serde_json::json!({})
        );
    }

    #[test]
    fn deploy_crd_yaml_is_what_ferry_operator_crd_prints() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crd.yaml");
        let file = std::fs::read_to_string(path).unwrap();
        let body: String = file
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            body.trim_end(),
            crd_yaml().trim_end(),
            "regenerate it: ferry operator crd > deploy/crd.yaml (keep the comment line)"
        );
    }
}
