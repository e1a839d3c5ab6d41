//! `ferry exec NAME -- CMD...`: a command in a running VM, through its
//! owner's control socket and the guest agent.

use std::time::Duration;

use ferry_agent_proto::b64_decode;

use crate::control::{call, ControlReply, ControlRequest, ExecOutput};
use crate::error::VmError;
use crate::vmdir::{files, running_vm_dir};
use crate::{Paths, RuntimeError};

/// Output of `ferry exec`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code.
    pub exit_code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Whether output was cut.
    pub truncated: bool,
    /// Whether the command hit its timeout.
    pub timed_out: bool,
}

/// `ferry exec NAME -- CMD...`: runs a command in a running VM.
pub fn exec(
    paths: &Paths,
    name: &str,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
) -> Result<ExecResult, RuntimeError> {
    if argv.is_empty() {
        return Err(RuntimeError::BadOption(
            "no command given: use 'ferry exec NAME -- CMD [ARGS...]'".into(),
        ));
    }
    let dir = running_vm_dir(paths, name)?;
    let request = ControlRequest::Exec {
        argv,
        stdin_b64: stdin.as_deref().and_then(crate::vm::stdin_payload),
        timeout_ms: timeout.map(|t| t.as_millis() as u64),
    };
    let wait = timeout.unwrap_or(Duration::from_secs(3600)) + Duration::from_secs(30);
    match call(&dir.join(files::CONTROL), &request, wait)? {
        ControlReply::Exec(ExecOutput {
            exit_code,
            stdout_b64,
            stderr_b64,
            truncated,
            timed_out,
        }) => Ok(ExecResult {
            exit_code,
            stdout: b64_decode(&stdout_b64).map_err(|e| VmError::Agent(e.to_string()))?,
            stderr: b64_decode(&stderr_b64).map_err(|e| VmError::Agent(e.to_string()))?,
            truncated,
            timed_out,
        }),
        // The supervisor's message may be an agent error already.
        ControlReply::Error { message } => Err(VmError::Agent(
            message
                .strip_prefix("guest agent: ")
                .map(String::from)
                .unwrap_or(message),
        )
        .into()),
        other => Err(VmError::Agent(format!("unexpected reply: {other:?}")).into()),
    }
}
