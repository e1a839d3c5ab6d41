//! What a package says about the VM inside it, as one type: read from a
//! package (local or remote) and written by the save path. Unknown fields
//! (from a newer ferry) are tolerated; a missing required field is refused
//! with an error naming it.

use ferry_blueprint::NetworkConfig;
use ferry_engine::Provenance;
use ferry_package::{Package, PackageWriter};
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// What a package says about the VM inside it (its metadata, and its
/// `config` section).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackageMeta {
    /// The ferry version that last wrote it.
    pub ferry_version: String,
    /// When it was last written (seconds since the Unix epoch).
    pub written_unix: u64,
    /// How many times it was suspended back into after the first snapshot.
    pub generation: u64,
    /// Engine, CPU model, accelerator and sizes it was made with.
    pub provenance: Provenance,
    /// The recipe of the blueprint it was made from.
    pub recipe: String,
    /// Kernel command line (needed to start the engine, not to boot).
    pub cmdline: String,
    /// Guest network settings.
    pub network: NetworkConfig,
    /// How the agent judges the service live.
    pub liveness: ferry_agent_proto::Liveness,
    /// Guest RAM is in the device state, not the memory section (which is
    /// then all zero): how a copy-on-write clone, whose changed pages are
    /// private to its engine and in no file, is saved (`ferry stop` of a
    /// fleet VM). Restoring such a package loads RAM from the device state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_in_state: bool,
}

/// The metadata of `pkg`.
pub fn read(pkg: &Package) -> Result<PackageMeta, RuntimeError> {
    from_json(pkg.metadata(), &pkg.path().display().to_string())
}

/// Metadata from its JSON form; `source` names the package in errors.
pub fn from_json(value: &serde_json::Value, source: &str) -> Result<PackageMeta, RuntimeError> {
    serde_json::from_value(value.clone()).map_err(|e| RuntimeError::NotAVmPackage {
        package: source.to_string(),
        detail: e.to_string(),
    })
}

/// Commits `writer` with `meta` as the package's metadata.
pub(crate) fn commit(writer: PackageWriter, meta: &PackageMeta) -> Result<(), RuntimeError> {
    writer.commit(serde_json::to_value(meta).expect("metadata serialises"))?;
    Ok(())
}
