//! Reading the fleet file the agent writes (`ferry_agent_proto::FleetFile`).
//!
//! It is read again on every request that needs it: the agent replaces it
//! whenever the host sends a new list, and a cache would need to notice
//! that. It is a small file on a tmpfs, so reading it is cheap.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_agent_proto::FleetFile;

/// Why the fleet file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// It exists but cannot be read.
    #[error("cannot read the fleet file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a fleet file.
    #[error("the fleet file {path} is not valid: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// A member's address is not a numeric `IP:PORT`.
    #[error(
        "the fleet file gives '{addr}' as the address of '{name}', which is not a numeric IP:PORT"
    )]
    BadAddress {
        /// The member.
        name: String,
        /// What the file says.
        addr: String,
    },
}

/// The fleet in `path`; `None` while there is no file (no fleet set yet).
pub fn read(path: &Path) -> Result<Option<FleetFile>, FleetError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FleetError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| FleetError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A member's address. Numeric only: a static binary cannot resolve names
/// without NSS, and the agent only writes numeric ones.
pub fn address(name: &str, addr: &str) -> Result<SocketAddr, FleetError> {
    addr.parse().map_err(|_| FleetError::BadAddress {
        name: name.to_owned(),
        addr: addr.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_none_and_garbage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("ferry-web-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleet.json");
        assert!(read(&path).unwrap().is_none());
        std::fs::write(&path, "{\"self\": 1}").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("is not valid"), "{e}");
        std::fs::write(
            &path,
            r#"{"self":"a","members":{"b":"127.0.0.1:9"},"updated_unix":5}"#,
        )
        .unwrap();
        let fleet = read(&path).unwrap().unwrap();
        assert_eq!(fleet.self_name, "a");
        assert_eq!(
            address("b", &fleet.members["b"]).unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(address("b", "web-2:80").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
