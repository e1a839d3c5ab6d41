//! What a ferry VM package says about the VM inside it: [`VmMeta`], the
//! typed form of the metadata in the package's section table.
//!
//! The package format itself carries any JSON as metadata (so that the file
//! format does not change when the VM's description does). Every ferry
//! package holding a VM carries a `VmMeta` there, and it crosses crate
//! borders only in this typed form: the runtime writes it, the runtime and
//! the transport read it, and a migration offer carries it to another peer.
//!
//! Compatibility, in both directions between ferry versions:
//! - a field added by a newer writer is ignored on reading (also inside
//!   `network`, whose blueprint type refuses unknown keys in a manifest);
//! - a field this version needs and does not find is refused with
//!   [`PackageError::NotAVmPackage`], which names it;
//! - a field added later must be optional (`#[serde(default)]`), or older
//!   packages stop reading.

use ferry_agent_proto::Liveness;
use ferry_blueprint::NetworkConfig;
use ferry_engine::Provenance;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::PackageError;

/// What a package says about the VM inside it. Stored as the package's
/// metadata and also written into its `config` section; a live migration
/// offer carries it too. The serde names are the format: renaming a field
/// makes every existing package unreadable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmMeta {
    /// The ferry version that last wrote it: says who to ask when a package
    /// does not read.
    pub ferry_version: String,
    /// When it was last written (seconds since the Unix epoch).
    pub written_unix: u64,
    /// How many times it was suspended back into after the first snapshot:
    /// tells a user which save they hold.
    pub generation: u64,
    /// Engine, CPU model, accelerator and sizes it was made with: a restore
    /// where these differ is refused before the engine is started.
    pub provenance: Provenance,
    /// The recipe of the blueprint it was made from (the default VM name).
    pub recipe: String,
    /// Kernel command line (needed to start the engine, not to boot).
    pub cmdline: String,
    /// Guest network settings: the guest keeps the address it was saved
    /// with, so the host side must match it.
    #[serde(deserialize_with = "tolerant_network")]
    pub network: NetworkConfig,
    /// How the agent judges the service live, checked after every resume.
    pub liveness: Liveness,
    /// Guest RAM is in the device state, not the memory section (which is
    /// then all zero): how a copy-on-write clone, whose changed pages are
    /// private to its engine and in no file, is saved (`ferry stop` of a
    /// fleet VM). Restoring such a package loads RAM from the device state.
    /// Absent (false) in most packages, and in those written before it
    /// existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_in_state: bool,
}

impl VmMeta {
    /// Reads the metadata of a package (or of a migration offer) written by
    /// this or another ferry version.
    ///
    /// # Arguments
    /// - `value`: the metadata as stored.
    /// - `source`: where it came from (a path, a URL), for the message.
    ///
    /// # Errors
    /// [`PackageError::NotAVmPackage`] if a field this version needs is
    /// missing or has the wrong type (the message names it). Fields it does
    /// not know are ignored: they come from a newer writer.
    ///
    /// # Examples
    /// ```
    /// let e = ferry_package::VmMeta::from_json(&serde_json::json!({}), "vm.ferry").unwrap_err();
    /// assert!(e.to_string().contains("ferry_version"));
    /// ```
    pub fn from_json(value: &serde_json::Value, source: &str) -> Result<VmMeta, PackageError> {
        VmMeta::deserialize(value).map_err(|e| PackageError::NotAVmPackage {
            package: source.to_string(),
            detail: e.to_string(),
        })
    }
}

/// [`NetworkConfig`] refuses unknown keys (a typo in a blueprint manifest
/// must not pass); in package metadata an unknown key is a newer writer's,
/// and is ignored. Same fields as `NetworkConfig`: one added there fails to
/// compile here until it is added (as optional, for older packages).
fn tolerant_network<'de, D: Deserializer<'de>>(d: D) -> Result<NetworkConfig, D::Error> {
    #[derive(Deserialize)]
    struct Network {
        interface: String,
        guest_address: String,
        prefix_len: u8,
        gateway: String,
    }
    let n = Network::deserialize(d)?;
    Ok(NetworkConfig {
        interface: n.interface,
        guest_address: n.guest_address,
        prefix_len: n.prefix_len,
        gateway: n.gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> serde_json::Value {
        json!({
            "ferry_version": "0.1.0",
            "written_unix": 1700000000,
            "generation": 2,
            "provenance": {
                "engine": "qemu",
                "engine_version": "8.2.2",
                "cpu_model": "max",
                "accel": "kvm",
                "memory_mib": 512,
                "cpus": 1
            },
            "recipe": "redis",
            "cmdline": "console=ttyS0",
            "network": {
                "interface": "eth0",
                "guest_address": "172.100.100.2",
                "prefix_len": 30,
                "gateway": "172.100.100.1"
            },
            "liveness": {"kind": "tcp", "port": 6379}
        })
    }

    #[test]
    fn reads_what_it_writes() {
        let meta = VmMeta::from_json(&sample(), "p").unwrap();
        assert_eq!(meta.recipe, "redis");
        assert_eq!(meta.liveness, Liveness::Tcp { port: 6379 });
        assert!(!meta.memory_in_state);
        let again = serde_json::to_value(&meta).unwrap();
        // memory_in_state is left out when false, as before.
        assert!(again.get("memory_in_state").is_none());
        assert_eq!(VmMeta::from_json(&again, "p").unwrap(), meta);
        let clone = VmMeta {
            memory_in_state: true,
            ..meta
        };
        let v = serde_json::to_value(&clone).unwrap();
        assert_eq!(v["memory_in_state"], json!(true));
        assert_eq!(VmMeta::from_json(&v, "p").unwrap(), clone);
    }

    #[test]
    fn fields_from_a_newer_writer_are_ignored() {
        let mut v = sample();
        v["future_field"] = json!({"anything": [1, 2]});
        v["provenance"]["future"] = json!("x");
        v["network"]["ipv6"] = json!("fd00::2");
        v["liveness"]["timeout_ms"] = json!(500);
        let meta = VmMeta::from_json(&v, "p").unwrap();
        assert_eq!(meta, VmMeta::from_json(&sample(), "p").unwrap());
    }

    #[test]
    fn a_missing_field_is_named() {
        for field in ["recipe", "provenance", "network", "liveness", "generation"] {
            let mut v = sample();
            v.as_object_mut().unwrap().remove(field);
            let e = VmMeta::from_json(&v, "/srv/vm.ferry").unwrap_err();
            assert!(matches!(e, PackageError::NotAVmPackage { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.starts_with("/srv/vm.ferry is a package but not a ferry VM package this version understands ("), "{msg}");
            assert!(msg.contains(&format!("`{field}`")), "{msg}");
            assert!(msg.ends_with("make it again with 'ferry package'"), "{msg}");
        }
        let mut v = sample();
        v["network"].as_object_mut().unwrap().remove("gateway");
        let msg = VmMeta::from_json(&v, "p").unwrap_err().to_string();
        assert!(msg.contains("`gateway`"), "{msg}");
    }

    #[test]
    fn other_metadata_is_not_a_vm_package() {
        for v in [
            json!(null),
            json!({}),
            json!({"made-by": "test"}),
            json!([1]),
        ] {
            let e = VmMeta::from_json(&v, "p").unwrap_err();
            assert!(matches!(e, PackageError::NotAVmPackage { .. }), "{e:?}");
        }
    }
}
