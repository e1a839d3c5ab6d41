//! `set-fleet`: the fleet file programs in the guest read.
//!
//! The agent keeps no fleet state of its own: the file is the state, so a
//! reader never sees anything the agent does not also "know", and a restarted
//! agent has nothing to reload. The file is replaced atomically (a temporary
//! file in the same directory, then `rename`), so a reader sees the old list
//! or the new one, never half of either.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_agent_proto::{FleetFile, FleetMember, Reply};

/// Checks the fleet and writes it to `path`; the reply for the host.
pub fn set(path: &Path, self_name: &str, members: &[FleetMember]) -> Reply {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let file = match FleetFile::from_request(self_name, members, now) {
        Ok(file) => file,
        Err(e) => {
            return Reply::Error {
                message: format!("set-fleet: {e}"),
            }
        }
    };
    match write_atomically(path, &file) {
        Ok(()) => {
            debug!(
                "fleet of {}: {} member(s) written to {}",
                file.self_name,
                file.members.len(),
                path.display()
            );
            Reply::FleetSet
        }
        Err(e) => {
            info!("cannot write the fleet file {}: {e}", path.display());
            Reply::Error {
                message: format!("set-fleet: cannot write {}: {e}", path.display()),
            }
        }
    }
}

/// Writes `file` as JSON to a temporary file beside `path`, then renames it
/// over `path`. The temporary name is unique per write, so two overlapping
/// requests cannot write into each other's file; the later rename wins.
fn write_atomically(path: &Path, file: &FleetFile) -> std::io::Result<()> {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let mut text = serde_json::to_vec(file).expect("a fleet file always serialises");
    text.push(b'\n');
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fleet.json".to_owned());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&text)?;
        // `/run` is a tmpfs, where this costs nothing; elsewhere (tests, an
        // overridden path) it keeps the rename from exposing an empty file
        // after a crash.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::TempDir;

    fn member(name: &str, addr: &str) -> FleetMember {
        FleetMember {
            name: name.into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn writes_and_replaces_the_file() {
        let dir = TempDir::new("fleet");
        let path = dir.path().join("run/ferry/fleet.json");
        let reply = set(&path, "a", &[member("b", "172.100.100.1:18002")]);
        assert_eq!(reply, Reply::FleetSet);
        let file: FleetFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(file.self_name, "a");
        assert_eq!(file.members["b"], "172.100.100.1:18002");
        assert!(file.updated_unix > 1_600_000_000);

        assert_eq!(set(&path, "a", &[]), Reply::FleetSet);
        let file: FleetFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(file.members.is_empty());
        // Nothing but the file itself is left in its directory.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("fleet.json")]);
    }

    #[test]
    fn a_bad_fleet_changes_nothing() {
        let dir = TempDir::new("fleet-bad");
        let path = dir.path().join("fleet.json");
        assert_eq!(
            set(&path, "a", &[member("b", "1.2.3.4:5")]),
            Reply::FleetSet
        );
        let before = std::fs::read(&path).unwrap();
        let reply = set(&path, "a", &[member("b", "not-an-address")]);
        assert!(
            matches!(&reply, Reply::Error { message } if message.contains("not-an-address")),
            "{reply:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
