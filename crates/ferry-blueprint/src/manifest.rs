//! `blueprint.toml`: what a blueprint holds and how to boot it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_agent_proto::Liveness;
use serde::{Deserialize, Serialize};

use crate::recipe::Defaults;
use crate::{sha256_file, BlueprintError};

/// Version of the blueprint layout; bumped on incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the manifest inside a blueprint directory.
pub const MANIFEST: &str = "blueprint.toml";

/// The manifest of a blueprint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The recipe it was built from.
    pub recipe: String,
    /// The ferry version that built it.
    pub built_by: String,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Default and minimum VM sizes.
    pub defaults: Defaults,
    /// Guest network settings (already baked into the disk's init).
    pub network: NetworkConfig,
    /// The service command, for display; the agent reads its own copy.
    #[serde(default)]
    pub service: Option<Vec<String>>,
    /// How the agent judges the service live.
    pub liveness: Liveness,
    /// Seconds a cold boot may take to become live.
    pub live_timeout_s: u64,
    /// The agent protocol version baked into the guest.
    pub agent_protocol: u32,
    /// Host-built binaries copied into the disk (recipe `[binaries]`):
    /// guest path → SHA-256, to tell which build went in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub binaries: BTreeMap<String, String>,
    /// The kernel image.
    pub kernel: FileEntry,
    /// The initramfs.
    pub initramfs: FileEntry,
    /// The root disk.
    pub disk: FileEntry,
}

/// One file of a blueprint and its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// File name inside the blueprint directory.
    pub file: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Guest network settings. Every guest uses the same address inside its own
/// network namespace, so a snapshot resumes anywhere without re-addressing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The guest's interface.
    pub interface: String,
    /// The guest's address.
    pub guest_address: String,
    /// Prefix length of the guest's subnet.
    pub prefix_len: u8,
    /// The gateway (the host side of the tap).
    pub gateway: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            interface: "eth0".into(),
            guest_address: "172.100.100.2".into(),
            prefix_len: 30,
            gateway: "172.100.100.1".into(),
        }
    }
}

/// A blueprint on disk.
#[derive(Debug, Clone)]
pub struct Blueprint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Blueprint {
    /// Reads a blueprint's manifest and checks that its files exist. Use
    /// [`Blueprint::verify`] to check their contents.
    pub fn load(dir: &Path) -> Result<Self, BlueprintError> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Err(BlueprintError::MissingFile {
                dir: dir.to_path_buf(),
                file: MANIFEST.into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(BlueprintError::io(&path))?;
        let manifest: Manifest =
            toml::from_str(&text).map_err(|e| BlueprintError::BadManifest {
                dir: dir.to_path_buf(),
                message: e.to_string().replace('\n', " "),
            })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(BlueprintError::BadManifest {
                dir: dir.to_path_buf(),
                message: format!(
                    "format version {} is not supported (this ferry reads {FORMAT_VERSION}); rebuild it with 'ferry blueprint build'",
                    manifest.format_version
                ),
            });
        }
        let bp = Blueprint {
            dir: dir.to_path_buf(),
            manifest,
        };
        for entry in bp.entries() {
            if !bp.dir.join(&entry.file).is_file() {
                return Err(BlueprintError::MissingFile {
                    dir: bp.dir.clone(),
                    file: entry.file.clone(),
                });
            }
        }
        Ok(bp)
    }

    fn entries(&self) -> [&FileEntry; 3] {
        [
            &self.manifest.kernel,
            &self.manifest.initramfs,
            &self.manifest.disk,
        ]
    }

    /// Checks every file against its recorded SHA-256. With `cache`
    /// (ferry's cache directory), a file's digest comes from the cache's
    /// memo of it ([`ferry_engine::memo::sha256`], keyed by the file's
    /// identity, which any write changes) when there is one: hashing a
    /// 1 GiB disk on every boot would cost seconds. The kernel's digest
    /// learnt here is the one that keys the accelerator's verdict and names
    /// the kernel in a live move's offer.
    pub fn verify(&self, cache: Option<&Path>) -> Result<(), BlueprintError> {
        for entry in self.entries() {
            let path = self.dir.join(&entry.file);
            let actual = match cache {
                Some(cache) => {
                    ferry_engine::memo::sha256(cache, &path).map_err(BlueprintError::io(&path))?
                }
                None => sha256_file(&path)?.0,
            };
            if actual != entry.sha256 {
                return Err(BlueprintError::Corrupt {
                    dir: self.dir.clone(),
                    file: entry.file.clone(),
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Path of the kernel image.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.file)
    }

    /// Path of the initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join(&self.manifest.initramfs.file)
    }

    /// Path of the root disk image.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.disk.file)
    }
}
