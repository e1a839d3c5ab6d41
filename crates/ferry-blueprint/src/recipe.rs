//! Recipes: what goes into a blueprint, as data. The built-in ones live in the
//! repository's `recipes/` directory and are compiled in; any other `.toml`
//! file of the same shape can be named by path.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_agent_proto::Liveness;
use serde::{Deserialize, Serialize};

use crate::manifest::NetworkConfig;
use crate::{binaries, BlueprintError};

const BUILTIN: &[(&str, &str)] = &[
    ("tiny", include_str!("../../../recipes/tiny.toml")),
    ("redis", include_str!("../../../recipes/redis.toml")),
    ("web", include_str!("../../../recipes/web.toml")),
    ("node", include_str!("../../../recipes/node.toml")),
];

/// A recipe, as written in a recipe `.toml` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Short name, recorded in the blueprint.
    pub name: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// Which kernel to boot.
    pub kernel: KernelSpec,
    /// How to make the root file system.
    pub rootfs: RootfsSpec,
    /// The disk image.
    pub disk: DiskSpec,
    /// Default and minimum VM sizes.
    pub defaults: Defaults,
    /// The service the guest runs.
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    /// How the agent judges the service live.
    pub liveness: LivenessSpec,
    /// Guest network settings.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Extra files to write into the root file system: path → contents.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Host-built static binaries to put into the root file system: guest
    /// path → binary name, found by [`crate::HostBinaries`].
    #[serde(default)]
    pub binaries: BTreeMap<String, String>,
    /// Keep a shell on the serial console (for `--enable-input`).
    #[serde(default = "default_console_shell")]
    pub console_shell: bool,
}

fn default_console_shell() -> bool {
    true
}

/// The guest kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    /// A Debian kernel image package, or a metapackage that depends on one.
    pub package: String,
    /// The kernel command line.
    pub cmdline: String,
}

/// How the root file system is made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RootfsSpec {
    /// Only busybox (installed with all its applets).
    Busybox,
    /// Nothing but the directories every guest needs (and ferry's own
    /// `/ferry`): no shell, no tools. The service comes from `[binaries]`.
    Empty,
    /// Debian via debootstrap.
    Debootstrap {
        /// The Debian suite, e.g. `bookworm`.
        suite: String,
        /// The debootstrap variant, e.g. `minbase`.
        #[serde(default = "default_variant")]
        variant: String,
        /// Extra packages.
        #[serde(default)]
        include: Vec<String>,
        /// The mirror; default: the host's own apt source.
        #[serde(default)]
        mirror: Option<String>,
        /// Absolute paths removed from the tree before it becomes the disk
        /// (documentation, manuals, translations): a node image that is
        /// downloaded into RAM on every boot should carry nothing it does
        /// not run. The cached tree keeps them.
        #[serde(default)]
        remove: Vec<String>,
    },
}

fn default_variant() -> String {
    "minbase".into()
}

/// The disk image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Size of the ext4 image in MiB (sparse on the host).
    pub size_mib: u64,
}

/// VM sizes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Guest memory unless the user says otherwise.
    pub memory_mib: u64,
    /// vCPUs unless the user says otherwise.
    pub cpus: u32,
    /// Below this the service does not fit; ferry refuses to boot.
    pub min_memory_mib: u64,
}

/// The service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Program and arguments, looked up in the guest's `PATH`.
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Liveness check plus how long to wait for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LivenessSpec {
    /// The check itself.
    #[serde(flatten)]
    pub check: Liveness,
    /// Seconds a cold boot may take to become live.
    #[serde(default = "default_live_timeout")]
    pub timeout_s: u64,
}

fn default_live_timeout() -> u64 {
    120
}

impl Recipe {
    /// Names of the built-in recipes.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// Finds a recipe by built-in name, or reads it from a `.toml` path.
    pub fn find(name: &str) -> Result<Self, BlueprintError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
            return Self::parse(text, name);
        }
        let path = Path::new(name);
        if name.ends_with(".toml") || name.contains('/') {
            let text = std::fs::read_to_string(path).map_err(BlueprintError::io(path))?;
            return Self::parse(&text, name);
        }
        Err(BlueprintError::UnknownRecipe {
            name: name.to_string(),
            known: Self::builtin_names().join(", "),
        })
    }

    /// Parses recipe text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, BlueprintError> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| BlueprintError::BadRecipe {
            path: origin.to_string(),
            message: e.to_string().replace('\n', " "),
        })?;
        let bad = |message: String| BlueprintError::BadRecipe {
            path: origin.to_string(),
            message,
        };
        if recipe.defaults.min_memory_mib > recipe.defaults.memory_mib {
            return Err(bad(
                "defaults.min_memory_mib is larger than defaults.memory_mib".into(),
            ));
        }
        if let RootfsSpec::Debootstrap { remove, .. } = &recipe.rootfs {
            for path in remove {
                check_removable(path).map_err(|e| bad(format!("rootfs.remove: {e}")))?;
            }
        }
        for (guest_path, name) in &recipe.binaries {
            binaries::check_guest_path(guest_path)
                .and_then(|()| binaries::check_name(name))
                .map_err(|e| bad(format!("[binaries]: {e}")))?;
        }
        Ok(recipe)
    }
}

/// A path `rootfs.remove` may name: absolute, no `..`, not the root and
/// not ferry's own `/ferry`.
fn check_removable(path: &str) -> Result<(), String> {
    let rel = path
        .strip_prefix('/')
        .ok_or_else(|| format!("'{path}' is not absolute"))?
        .trim_end_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "'{path}' must name a path below / without '.', '..' or '//'"
        ));
    }
    if rel == "ferry" || rel.starts_with("ferry/") {
        return Err(format!("'{path}' is ferry's own"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipes_parse() {
        for name in Recipe::builtin_names() {
            let r = Recipe::find(name).unwrap();
            assert_eq!(r.name, name);
        }
        let redis = Recipe::find("redis").unwrap();
        assert_eq!(redis.liveness.check, Liveness::Tcp { port: 6379 });
        let web = Recipe::find("web").unwrap();
        assert_eq!(web.liveness.check, Liveness::Tcp { port: 8000 });
        assert_eq!(web.binaries["/usr/local/bin/ferry-web"], "ferry-web");
        let node = Recipe::find("node").unwrap();
        assert!(node.service.is_some());
        assert!(matches!(node.liveness.check, Liveness::Exec { .. }));
    }

    #[test]
    fn removed_paths_are_checked() {
        assert!(check_removable("/usr/share/doc").is_ok());
        assert!(check_removable("/usr/share/man/").is_ok());
        for bad in [
            "usr/share",
            "/",
            "/usr/../etc",
            "/usr//x",
            "/ferry",
            "/ferry/init",
        ] {
            assert!(check_removable(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_binaries_are_reported() {
        let base = include_str!("../../../recipes/tiny.toml");
        for (entry, complaint) in [
            (r#""usr/bin/x" = "x""#, "absolute"),
            (r#""/ferry/x" = "x""#, "outside /ferry"),
            (r#""/bin/x" = "../x""#, "file name"),
        ] {
            let text = format!("{base}\n[binaries]\n{entry}\n");
            let e = Recipe::parse(&text, "x.toml").unwrap_err().to_string();
            assert!(e.contains("[binaries]") && e.contains(complaint), "{e}");
        }
    }

    #[test]
    fn unknown_recipe_names_the_known_ones() {
        let e = Recipe::find("nginx").unwrap_err().to_string();
        assert!(e.contains("unknown recipe 'nginx'"), "{e}");
        assert!(e.contains("tiny, redis, web, node"), "{e}");
    }

    #[test]
    fn typo_in_recipe_is_reported() {
        let text = include_str!("../../../recipes/tiny.toml").replace("[disk]", "[dsik]");
        let e = Recipe::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("recipe x.toml:"), "{e}");
    }
}
