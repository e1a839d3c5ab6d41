//! Turns the runtime's events into what a person or a script reads.
//!
//! Human form (the default): results on standard output (`accel: …`,
//! `live in N ms`, `packaged …`), commentary on standard error (`==> …`,
//! `VM 'x' is running …`). With `--json`, standard output carries only JSON
//! lines, one object per event, `{"v":1,"type":…}` (`docs/events.md`), and
//! a failure ends with `{"v":1,"type":"error","exit_class":…,"message":…}`;
//! human text still goes to standard error.

use std::io::Write;

use ferry_engine::AccelDecision;
use ferry_runtime::events::{CancelAction, Event, EventSink, JsonLine, EVENTS_VERSION};

/// Renders events for the terminal or for a script.
pub struct Render {
    json: bool,
}

impl Render {
    /// `json`: JSON lines on standard output instead of human lines.
    pub fn new(json: bool) -> Self {
        Render { json }
    }

    /// Whether output is JSON lines.
    pub fn json(&self) -> bool {
        self.json
    }

    /// The error line that ends a failed command's JSON output.
    pub fn error(&self, class: &str, code: u8, message: &str) {
        if self.json {
            let line = serde_json::json!({
                "v": EVENTS_VERSION,
                "type": "error",
                "exit_class": class,
                "exit_code": code,
                "message": message,
            });
            out(&line.to_string());
        }
    }
}

impl EventSink for Render {
    fn emit(&self, event: Event) {
        fault_hook(&event);
        if self.json {
            if let Ok(line) = serde_json::to_string(&JsonLine::new(&event)) {
                out(&line);
            }
            // Commentary for a person watching stays on stderr.
            if let Some(Line::Err(text)) = human(&event) {
                err(&text);
            }
            return;
        }
        match human(&event) {
            Some(Line::Out(text)) => out(&text),
            Some(Line::Err(text)) => err(&text),
            None => {}
        }
    }
}

enum Line {
    Out(String),
    Err(String),
}

/// The human line of an event, and where it goes.
fn human(event: &Event) -> Option<Line> {
    use Line::{Err, Out};
    Some(match event {
        Event::Accel { accel, reason } => Out(AccelDecision {
            accel: *accel,
            reason: reason.clone(),
        }
        .to_string()),
        Event::Phase { phase, ms } => {
            tracing::info!(phase, ms, "phase");
            return None;
        }
        Event::Progress { what, done, total } => {
            Err(format!("    {what}: {} / {} MiB", done >> 20, total >> 20))
        }
        Event::Resumed { ms, .. } => Out(format!("resumed in {ms} ms")),
        Event::Live { ms, .. } => Out(format!("live in {ms} ms")),
        Event::Network { netns, exposes } => {
            let mut line = format!("network: namespace {netns}");
            for e in exposes {
                line.push_str(&format!(
                    "; {} -> guest port {}",
                    e.host_addr(),
                    e.guest_port
                ));
            }
            Out(line)
        }
        Event::Running {
            name,
            memory_mib,
            cpus,
            source,
            on_cancel,
            save,
        } => Err(match on_cancel {
            CancelAction::Shutdown => format!(
                "VM '{name}' is running ({memory_mib} MiB, {cpus} vCPU); run commands in it with 'ferry exec {name} -- CMD'; Ctrl-C shuts it down"
            ),
            CancelAction::Discard => {
                format!("VM '{name}' is running from {source}; Ctrl-C discards this clone")
            }
            CancelAction::Suspend => match save {
                Some(p) if p.display().to_string() == *source => format!(
                    "VM '{name}' is running from {source}; Ctrl-C suspends it back into the package"
                ),
                Some(p) => format!(
                    "VM '{name}' is running here; Ctrl-C suspends it into {}",
                    p.display()
                ),
                None => format!("VM '{name}' is running from {source}"),
            },
        }),
        Event::LazyDisk {
            fetched_bytes,
            size_bytes,
        } => Out(format!(
            "disk: {} of {} MiB fetched when live ({}%); the rest follows in the background",
            fetched_bytes >> 20,
            size_bytes >> 20,
            fetched_bytes * 100 / (*size_bytes).max(1)
        )),
        Event::LazyDiskComplete {
            fetched_bytes,
            size_bytes,
            ms,
        } => Out(format!(
            "disk: all of its {} MiB is here ({} MiB fetched, the last {:.1} s after live); \
             the VM no longer needs the registry",
            size_bytes >> 20,
            fetched_bytes >> 20,
            *ms as f64 / 1000.0
        )),
        Event::LazyDiskLocal { file, ms } => Out(format!(
            "disk: QEMU reads and writes {} itself now (switched in {ms} ms)",
            file.display()
        )),
        Event::Fetched { from, bytes } => Err(format!(
            "==> fetched {} MiB from {from} (sections already in the cache are not fetched again)",
            bytes >> 20
        )),
        Event::Snapshotting { ms } => Err(format!("==> service live after {ms} ms; snapshotting")),
        Event::Packaged {
            path,
            ms,
            file_bytes,
            memory_mib,
        } => Out(format!(
            "packaged {} in {ms} ms: {} MiB file for {memory_mib} MiB of guest memory",
            path.display(),
            file_bytes >> 20
        )),
        Event::Suspending { path } => Err(format!("==> suspending into {}", path.display())),
        Event::Suspended { path, ms } => {
            Out(format!("suspended into {} in {ms} ms", path.display()))
        }
        Event::SuspendFailed {
            path,
            message,
            running,
        } => Err(if *running {
            format!(
                "ferry: could not suspend into {}: {message}; the package is unchanged and the VM keeps running: fix the cause and press Ctrl-C again",
                path.display()
            )
        } else {
            format!(
                "ferry: could not save the paused VM into {}: {message}; it stays paused: fix the cause and press Ctrl-C again",
                path.display()
            )
        }),
        Event::GuestError { name, what, .. } => Err(super::watch::error_line(name, what)),
        Event::ShuttingDown { name } => Err(format!("shutting down '{name}'")),
        Event::Discarding { name } => Err(format!("discarding clone '{name}'")),
        Event::Serving { name, addr } => Out(format!("serving VM '{name}' to peers on {addr}")),
        Event::MigratingOut { name, to } => Out(format!("migrating VM '{name}' to {to}")),
        Event::MovedOut { name, to, stats } => Out(format!(
            "moved VM '{name}' to {to}: {} ms in all, {} ms paused (engine's figure{}), {} MiB of memory and devices sent, {} MiB on the wire with the disk{}; exiting",
            stats.total_ms,
            stats.downtime_ms,
            match stats.downtime_limit_ms {
                0 => String::new(),
                limit => format!(", its limit {limit} ms"),
            },
            stats.state_bytes >> 20,
            stats.wire_bytes >> 20,
            match stats.throttle_pct {
                0 => String::new(),
                pct => format!(
                    "; the guest wrote faster than the link carried, so its vCPUs were slowed by up to {pct}% for the copy to end"
                ),
            }
        )),
        Event::MigrationFailed { name, to, message } => Err(format!(
            "ferry: migration to {to} failed: {message}; VM '{name}' keeps running here"
        )),
        Event::InDoubt {
            name,
            to,
            message,
            save,
        } => Err(format!(
            "ferry: migration to {to} is in doubt: {message}; VM '{name}' stays paused here and is not resumed (check {to}; Ctrl-C saves it into {})",
            save.display()
        )),
        Event::Receiving { name, from } => Out(format!("receiving VM '{name}' from {from}")),
        Event::Switching { .. } => return None,
        Event::MigratedIn {
            name,
            from,
            ms,
            downtime_ms,
            switch_ms,
        } => Out(format!(
            "migrated VM '{name}' from {from} in {ms} ms ({downtime_ms} ms paused at the source by its engine's count, {switch_ms} ms to resume here)"
        )),
        Event::Started(s) => Out(ferry_runtime::fleet::started_line(&s.name, Some(s))),
        Event::StartFailed { name, message } => Out(format!("{name}: failed: {message}")),
        Event::VmChanged(c) => Out(c.to_string()),
        Event::RegistryPackage {
            path,
            size,
            table_sha256,
            url,
        } => Out(format!(
            "serving {} ({size} bytes, table sha256 {table_sha256}) as {url}",
            path.display()
        )),
        Event::Listening {
            url,
            token_required,
        } => Out(if *token_required {
            format!("every request needs the token (Authorization: Bearer)\nlistening on {url}")
        } else {
            format!("listening on {url}")
        }),
        Event::Notice { message } => Out(message.clone()),
        Event::Warning { message } => Err(format!("ferry: warning: {message}")),
    })
}

/// Prints one line on standard output. A closed stdout (`ferry peer |
/// head -1`) must not take the VM down with a panic: the line is dropped.
pub fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn err(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Test builds only (`--features fault-injection`): a destination that dies
/// at the worst moment of a migration, after *switch* and before
/// *committed*, which a test cannot time from outside.
#[cfg(feature = "fault-injection")]
fn fault_hook(event: &Event) {
    if matches!(event, Event::Switching { .. })
        && std::env::var("FERRY_FAULT").as_deref() == Ok("exit-after-switch")
    {
        err("ferry: FERRY_FAULT=exit-after-switch: exiting");
        std::process::exit(99);
    }
}

#[cfg(not(feature = "fault-injection"))]
fn fault_hook(_: &Event) {}
