use std::path::PathBuf;

/// Everything that can go wrong building or loading a blueprint. Each message
/// names the cause and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum BlueprintError {
    /// The recipe name is neither built in nor a readable file.
    #[error("unknown recipe '{name}': built-in recipes are {known}; or give the path of a recipe .toml file")]
    UnknownRecipe {
        /// What the user asked for.
        name: String,
        /// The built-in recipe names.
        known: String,
    },
    /// A recipe file does not parse.
    #[error("recipe {path}: {message}")]
    BadRecipe {
        /// The recipe file (or built-in name).
        path: String,
        /// The parser's complaint.
        message: String,
    },
    /// The output directory already exists.
    #[error("{0} already exists: choose another --out or pass --force to replace it")]
    OutputExists(PathBuf),
    /// Not enough free space for the build.
    #[error("not enough free space in {dir}: the build needs about {need_mib} MiB, {have_mib} MiB are free; free some space or choose another --out")]
    NoSpace {
        /// Where the space is missing.
        dir: PathBuf,
        /// Estimated need.
        need_mib: u64,
        /// Available.
        have_mib: u64,
    },
    /// A host tool is missing.
    #[error(
        "{tool} not found: install it with 'apt-get install -y --no-install-recommends {package}'"
    )]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// A host tool ran and failed.
    #[error("{what} failed: {detail}")]
    ToolFailed {
        /// What was being done.
        what: String,
        /// Its error output (last lines) or exit status.
        detail: String,
    },
    /// The kernel package could not be resolved or unpacked.
    #[error("guest kernel: {0}")]
    Kernel(String),
    /// The guest agent binary is missing or unusable.
    #[error("guest agent: {0}")]
    Agent(String),
    /// A host-built binary the recipe names (`[binaries]`) is missing or
    /// unusable.
    #[error("recipe binary '{name}' (for {guest_path}): {problem}: {fix}")]
    Binary {
        /// The binary's name in the recipe.
        name: String,
        /// Where the recipe puts it in the guest.
        guest_path: String,
        /// What is wrong.
        problem: String,
        /// How to supply it.
        fix: String,
    },
    /// A blueprint directory lacks a file.
    #[error("blueprint {dir}: {file} is missing: rebuild it with 'ferry blueprint build'")]
    MissingFile {
        /// The blueprint directory.
        dir: PathBuf,
        /// The file name.
        file: String,
    },
    /// A blueprint file does not match its recorded checksum.
    #[error("blueprint {dir}: {file} is corrupt (sha256 {actual}, expected {expected}): rebuild it with 'ferry blueprint build'")]
    Corrupt {
        /// The blueprint directory.
        dir: PathBuf,
        /// The file name.
        file: String,
        /// Recorded checksum.
        expected: String,
        /// Checksum found.
        actual: String,
    },
    /// The manifest does not parse or has an unsupported version.
    #[error("blueprint {dir}: blueprint.toml: {message}")]
    BadManifest {
        /// The blueprint directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl BlueprintError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| BlueprintError::Io { path, source }
    }
}
