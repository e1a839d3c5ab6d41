//! Running host tools with errors that say which package to install.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::BlueprintError;

/// Finds `tool` in `PATH` (also the sbin directories, which a non-login root
/// shell may lack), or says which package provides it.
pub fn require(tool: &str, package: &str) -> Result<PathBuf, BlueprintError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| BlueprintError::MissingTool {
            tool: tool.to_string(),
            package: package.to_string(),
        })
}

/// Runs a command to completion; a failure carries the last lines of stderr.
pub fn run(what: &str, cmd: &mut Command) -> Result<Output, BlueprintError> {
    let out = cmd.output().map_err(|e| BlueprintError::ToolFailed {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(BlueprintError::ToolFailed {
            what: what.to_string(),
            detail: tail(&out.stderr, &out.stdout, out.status),
        });
    }
    Ok(out)
}

fn tail(stderr: &[u8], stdout: &[u8], status: std::process::ExitStatus) -> String {
    let text = if stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        String::from_utf8_lossy(stderr)
    } else {
        String::from_utf8_lossy(stdout)
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(3)..].join(" | ");
    if last.is_empty() {
        format!("exited with {status}")
    } else {
        format!("{last} ({status})")
    }
}
