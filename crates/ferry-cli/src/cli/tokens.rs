//! Token flags, shared by `registry` and `peer`: `--token`/`--token-file`
//! serve every role; `--registry-token-file` and `--migrate-token-file` set
//! one role's token. Every token is checked here, when the flags are read,
//! before any network I/O (`ferry_transport::Token`: at least 16
//! characters), and never printed.

use std::path::{Path, PathBuf};

use ferry_runtime::RuntimeError;
use ferry_transport::Token;

/// `--token` / `--token-file`: one token for every role.
#[derive(clap::Args, Debug)]
pub struct SharedToken {
    /// Bearer token for every role that has no token of its own (at least
    /// 16 characters, e.g. `openssl rand -hex 16`). Other users of this
    /// host can see it in the process list: prefer --token-file.
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the token from FILE (surrounding whitespace is ignored).
    #[arg(long = "token-file", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl SharedToken {
    /// The shared token, checked; `None` if neither flag is given.
    pub fn read(&self) -> Result<Option<Token>, RuntimeError> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => check("--token", t).map(Some),
            (None, Some(f)) => read_file("--token-file", f).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// A role's token: its own file (`flag FILE`) if given, else the shared
/// one.
pub fn role(
    flag: &str,
    own: Option<&Path>,
    shared: &Option<Token>,
) -> Result<Option<Token>, RuntimeError> {
    match own {
        Some(file) => read_file(flag, file).map(Some),
        None => Ok(shared.clone()),
    }
}

fn check(flag: &str, token: &str) -> Result<Token, RuntimeError> {
    Token::new(token).map_err(|e| RuntimeError::BadOption(format!("{flag}: {e}")))
}

/// Reads a token file (surrounding whitespace trimmed) and checks it.
pub(super) fn read_file(flag: &str, file: &Path) -> Result<Token, RuntimeError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        RuntimeError::BadOption(format!(
            "cannot read the token file {}: {e}: check {flag}",
            file.display()
        ))
    })?;
    check(&format!("{flag} {}", file.display()), text.trim())
}
