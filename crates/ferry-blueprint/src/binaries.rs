//! Host-built binaries that a recipe puts into the guest.
//!
//! A recipe names them in `[binaries]`, guest path → binary name:
//!
//! ```toml
//! [binaries]
//! "/usr/local/bin/ferry-web" = "ferry-web"
//! ```
//!
//! The recipe says *what* goes in; where the binary is on this host is the
//! builder's business, found the way the agent is ([`HostBinaries`]):
//!
//! 1. given explicitly (`ferry blueprint build --binary NAME=PATH`);
//! 2. `$FERRY_BIN_<NAME>`, the name upper-cased with every character other
//!    than a letter or digit turned into `_` (`FERRY_BIN_FERRY_WEB`);
//! 3. beside the `ferry` executable, or where `scripts/build.sh` leaves the
//!    static guest binaries (`target/agent/x86_64-unknown-linux-gnu/agent/`).
//!
//! Guests share nothing with the host, so every binary must be a static
//! x86-64 executable; in the search of step 3 only static ones count (a
//! plain `cargo build` leaves dynamic ones beside `ferry`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::rootfs::is_dynamic_elf;
use crate::BlueprintError;

/// Where `scripts/build.sh` puts static guest binaries, below `target/`.
pub const STATIC_TARGET_SUBDIR: &str = "agent/x86_64-unknown-linux-gnu/agent";

/// How the user can supply a missing binary, for error messages.
fn fix(name: &str) -> String {
    format!(
        "build it with scripts/build.sh (statically linked, +crt-static), or pass --binary {name}=PATH (or set {})",
        HostBinaries::env_var(name)
    )
}

/// Finds host-built binaries by name; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct HostBinaries {
    explicit: BTreeMap<String, PathBuf>,
    from_env: BTreeMap<String, PathBuf>,
    search: Vec<PathBuf>,
}

impl HostBinaries {
    /// Finds nothing until told where to look.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the `ferry` command uses: `$FERRY_BIN_*` and the directories of
    /// [`Self::search_dirs`] for the running executable.
    pub fn for_current_exe() -> Self {
        let mut found = Self::new();
        if let Ok(exe) = std::env::current_exe() {
            found.search = Self::search_dirs(&exe);
        }
        for (var, value) in std::env::vars_os() {
            let Some(var) = var.to_str() else { continue };
            if var.starts_with("FERRY_BIN_") && !value.is_empty() {
                found.from_env.insert(var.to_owned(), PathBuf::from(value));
            }
        }
        found
    }

    /// The directories searched for `exe`: its own, and the static build
    /// directory of the source tree it was built in (for `target/debug/ferry`
    /// and `target/release/ferry`, and one level deeper for test binaries in
    /// `target/debug/deps`).
    pub fn search_dirs(exe: &Path) -> Vec<PathBuf> {
        let dir = exe.parent().unwrap_or(Path::new("."));
        vec![
            dir.to_path_buf(),
            dir.join("..").join(STATIC_TARGET_SUBDIR),
            dir.join("../..").join(STATIC_TARGET_SUBDIR),
        ]
    }

    /// Uses `path` for binary `name` (what `--binary NAME=PATH` does).
    pub fn set(&mut self, name: &str, path: impl Into<PathBuf>) -> &mut Self {
        self.explicit.insert(name.to_owned(), path.into());
        self
    }

    /// Parses `NAME=PATH`, the form of `--binary`.
    ///
    /// # Errors
    /// A one-line message when there is no `=` or either side is empty.
    pub fn parse_flag(text: &str) -> Result<(String, PathBuf), String> {
        match text.split_once('=') {
            Some((name, path)) if check_name(name).is_ok() && !path.is_empty() => {
                Ok((name.to_owned(), PathBuf::from(path)))
            }
            _ => Err(format!(
                "'{text}' is not NAME=PATH (e.g. ferry-web=target/agent/x86_64-unknown-linux-gnu/agent/ferry-web)"
            )),
        }
    }

    /// The environment variable that names binary `name`'s path.
    pub fn env_var(name: &str) -> String {
        let suffix: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("FERRY_BIN_{suffix}")
    }

    /// The static binary `name`, which the recipe puts at `guest_path`.
    ///
    /// # Errors
    /// [`BlueprintError::Binary`] when it is not found, or the file given
    /// for it is missing or not a static x86-64 executable; the message
    /// names the fix.
    pub fn resolve(&self, name: &str, guest_path: &str) -> Result<PathBuf, BlueprintError> {
        let error = |problem: String| BlueprintError::Binary {
            name: name.to_owned(),
            guest_path: guest_path.to_owned(),
            problem,
            fix: fix(name),
        };
        let given = match self.explicit.get(name) {
            Some(path) => Some((path, format!("--binary {name}"))),
            None => self
                .from_env
                .get(&Self::env_var(name))
                .map(|path| (path, format!("${}", Self::env_var(name)))),
        };
        if let Some((path, source)) = given {
            let bytes = std::fs::read(path)
                .map_err(|e| error(format!("{} (from {source}): {e}", path.display())))?;
            return match is_dynamic_elf(&bytes) {
                Some(false) => Ok(path.clone()),
                Some(true) => Err(error(format!(
                    "{} (from {source}) is dynamically linked",
                    path.display()
                ))),
                None => Err(error(format!(
                    "{} (from {source}) is not an x86-64 ELF executable",
                    path.display()
                ))),
            };
        }
        let candidates: Vec<PathBuf> = self.search.iter().map(|d| d.join(name)).collect();
        if let Some(found) = candidates.iter().find(|p| is_static(p)) {
            return Ok(found.clone());
        }
        let looked = if candidates.is_empty() {
            "nowhere to look".to_owned()
        } else {
            format!(
                "no static one in {}",
                self.search
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Err(error(format!("not found ({looked})")))
    }
}

fn is_static(path: &Path) -> bool {
    path.is_file() && std::fs::read(path).ok().and_then(|b| is_dynamic_elf(&b)) == Some(false)
}

/// Checks a binary name: a plain file name.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "binary name '{name}' must be a file name (letters, digits, '.', '_', '-')"
        ))
    }
}

/// Checks where a recipe puts a binary: an absolute path to a file, with no
/// `.` or `..` parts, outside `/ferry` (which belongs to ferry).
pub(crate) fn check_guest_path(path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let ok = path.starts_with('/')
        && !parts.is_empty()
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && parts[0] != "ferry";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "binary path '{path}' must be an absolute file path outside /ferry, without '.' or '..' parts"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_environment_variable() {
        assert_eq!(HostBinaries::env_var("ferry-web"), "FERRY_BIN_FERRY_WEB");
        assert_eq!(HostBinaries::env_var("a.b_c"), "FERRY_BIN_A_B_C");
    }

    #[test]
    fn parses_the_flag() {
        assert_eq!(
            HostBinaries::parse_flag("ferry-web=/x/ferry-web"),
            Ok(("ferry-web".to_owned(), PathBuf::from("/x/ferry-web")))
        );
        for bad in ["ferry-web", "=/x", "ferry-web=", "a/b=/x"] {
            assert!(HostBinaries::parse_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_guest_paths() {
        assert!(check_guest_path("/usr/local/bin/ferry-web").is_ok());
        for bad in [
            "usr/bin/x",
            "/",
            "/usr/bin/",
            "/usr/../x",
            "/ferry/x",
            "//x",
        ] {
            assert!(check_guest_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn explains_a_missing_or_dynamic_binary() {
        let dir = tempfile::tempdir().unwrap();
        let mut bins = HostBinaries::new();
        bins.search = vec![dir.path().to_path_buf()];
        let e = bins
            .resolve("ferry-web", "/usr/local/bin/ferry-web")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'ferry-web' (for /usr/local/bin/ferry-web)"),
            "{e}"
        );
        assert!(e.contains("not found"), "{e}");
        assert!(e.contains("--binary ferry-web=PATH"), "{e}");
        assert!(e.contains("FERRY_BIN_FERRY_WEB"), "{e}");

        // Test binaries are dynamically linked: refused when given, skipped
        // when found by searching.
        let me = std::env::current_exe().unwrap();
        std::fs::copy(&me, dir.path().join("ferry-web")).unwrap();
        assert!(bins.resolve("ferry-web", "/x").is_err());
        bins.set("ferry-web", &me);
        let e = bins.resolve("ferry-web", "/x").unwrap_err().to_string();
        assert!(e.contains("is dynamically linked"), "{e}");
        assert!(e.contains("from --binary ferry-web"), "{e}");
    }

    /// The smallest file [`is_dynamic_elf`] takes for a static executable:
    /// an x86-64 ELF header without program headers.
    fn fake_static(path: &Path) {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        std::fs::write(path, elf).unwrap();
    }

    #[test]
    fn explicit_beats_environment_beats_search() {
        let dir = tempfile::tempdir().unwrap();
        let (searched, from_env, given) = (
            dir.path().join("ferry-web"),
            dir.path().join("env-web"),
            dir.path().join("given-web"),
        );
        for p in [&searched, &from_env, &given] {
            fake_static(p);
        }
        let mut bins = HostBinaries::new();
        bins.search = vec![dir.path().to_path_buf()];
        assert_eq!(bins.resolve("ferry-web", "/x").unwrap(), searched);
        bins.from_env
            .insert("FERRY_BIN_FERRY_WEB".into(), from_env.clone());
        assert_eq!(bins.resolve("ferry-web", "/x").unwrap(), from_env);
        bins.set("ferry-web", &given);
        assert_eq!(bins.resolve("ferry-web", "/x").unwrap(), given);
    }
}
