//! `ferry supervise` (hidden): the supervisor of one detached VM, started
//! by `ferry up`, `run --detach`, `peer --detach` and `start`, never by
//! hand. It reads its spec as JSON on standard input and reports on the
//! descriptor `--ready-fd` names (see `ferry_runtime::detach`).

use std::io::Read;
use std::process::ExitCode;

use ferry_runtime::detach::{supervise, DetachSpec, ReadyMsg, ReadyPipe};
use ferry_runtime::{Paths, RuntimeError};

use super::render::Render;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pipe to report readiness (or the error) on.
    #[arg(long = "ready-fd", value_name = "FD")]
    ready_fd: i32,
    /// The VM's name (also in the spec; here for `ps` of the host).
    name: String,
}

pub fn run(args: Args, paths: &Paths) -> anyhow::Result<ExitCode> {
    one_malloc_arena();
    let mut ready = ReadyPipe::from_fd(args.ready_fd)?;
    // SIGTERM/SIGINT from the start on: a stop before the VM is live must
    // not kill this process midway, which would leave a namespace behind.
    let cancel = super::signals::cancel_on_signals()?;
    // Its standard output and error are its log once the VM has a place.
    let log = Render::new(false);
    let result = read_spec(&args.name).and_then(|spec| {
        let engine = super::engine(paths)?;
        Ok(supervise(&engine, paths, &spec, &mut ready, &log, &cancel)?)
    });
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let code = super::exit_number(&e);
            if !ready.sent() {
                ready.send(&ReadyMsg::Failed {
                    code,
                    message: super::one_line(&e),
                });
            }
            eprintln!("ferry: {}", super::one_line(&e));
            Ok(ExitCode::from(code))
        }
    }
}

/// Puts every thread's allocations in one malloc arena. glibc gives each
/// thread that allocates an arena of its own; a supervisor's dozen threads
/// mostly wait, yet their arenas held about 300 KiB of the 2 MiB of
/// private memory it had, and a fleet pays that once per clone. Called
/// before the supervisor starts any thread.
fn one_malloc_arena() {
    // SAFETY: mallopt(3) only sets a parameter of glibc's allocator, which
    // is safe to change before other threads allocate.
    let changed = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if changed != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX, 1) was refused; threads keep their own arenas");
    }
}

/// The spec from standard input, which is then `/dev/null`: a supervisor
/// has no terminal and reads nothing else.
fn read_spec(name: &str) -> anyhow::Result<DetachSpec> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    if let Ok(null) = std::fs::File::open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2(2) of a descriptor `null` keeps open onto stdin.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
        }
    }
    let spec: DetachSpec = serde_json::from_str(&text)
        .map_err(|e| RuntimeError::Internal(format!("the supervisor's spec is not valid: {e}")))?;
    if spec.name != name {
        return Err(RuntimeError::Internal(format!(
            "the spec names '{}' but the supervisor was started for '{name}'",
            spec.name
        ))
        .into());
    }
    Ok(spec)
}
