//! Running ferry's servers on test hosts (network namespaces standing in
//! for machines), and talking to them as a user's script would: curl.

use std::path::Path;
use std::time::Duration;

use ferry_test_support::{describe, spawn_until, FerryEnv, Host, KillOnDrop};
use serde_json::Value;

/// How long a server may take to say it is ready: a registry checks its
/// packages first, a peer may wait for a whole migration.
const READY_WITHIN: Duration = Duration::from_secs(180);

/// `ferry ARGS` inside `host`, until a line starts with `ready`; its lines
/// until then. It runs in the env's state directory, where a peer's
/// Ctrl-C saves its VM.
pub fn start_with_lines(
    host: &Host,
    env: &FerryEnv,
    args: &[&str],
    ready: &str,
) -> (KillOnDrop, Vec<String>) {
    let mut cmd = host.ferry(env);
    cmd.args(args).current_dir(env.state.path());
    spawn_until(cmd, ready, READY_WITHIN)
}

/// [`start_with_lines`], without the lines.
pub fn start(host: &Host, env: &FerryEnv, args: &[&str], ready: &str) -> KillOnDrop {
    start_with_lines(host, env, args, ready).0
}

/// `ferry registry` on `r` serving `pkg` on every address at `port`, in
/// plain HTTP between test hosts on purpose (`--insecure`), with `token`
/// if given.
pub fn registry(
    r: &Host,
    env: &FerryEnv,
    pkg: &Path,
    port: u16,
    token: Option<&str>,
) -> KillOnDrop {
    let listen = format!("0.0.0.0:{port}");
    let mut args = vec![
        "registry",
        "--package",
        pkg.to_str().unwrap(),
        "--listen",
        &listen,
        "--insecure",
    ];
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    start(r, env, &args, "listening on ")
}

/// `curl ARGS` inside `host`: the HTTP status and the body as JSON (or
/// as a string when it is not JSON).
pub fn curl(host: &Host, args: &[&str]) -> (u16, Value) {
    let out = host
        .cmd("curl")
        .args(["-sS", "--max-time", "600", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {args:?}: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("a status line");
    let json = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (code.trim().parse().expect("a status"), json)
}
