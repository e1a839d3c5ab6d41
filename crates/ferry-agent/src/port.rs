//! Finding and opening the port the host talks on.
//!
//! In the guest it is the virtio-serial port named
//! [`ferry_agent_proto::PORT_NAME`]; its device node is `/dev/vportNpM` with
//! numbers that depend on device probe order, so it is found by name under
//! `/sys/class/virtio-ports/*/name`. The driver may still be loading when the
//! agent starts, hence the retry loop. On the host (tests) `--port` names a
//! device, FIFO or Unix socket instead.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::outbox::PortWriter;

/// Where the kernel lists virtio-serial ports.
pub const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// How often a missing port is looked for again.
const RETRY: Duration = Duration::from_millis(100);
/// How long to wait quietly before saying the port is missing.
const COMPLAIN_AFTER: Duration = Duration::from_secs(5);

/// A port's read side.
pub type PortReader = Box<dyn Read + Send>;

/// Returns the name of the port directory under `sysfs` (e.g. `vport1p1`)
/// whose `name` file holds `wanted`. The device node has the same name under
/// `/dev`. Entries are searched in name order so the answer is stable.
pub fn find_port(sysfs: &Path, wanted: &str) -> Option<String> {
    let mut entries: Vec<_> = fs::read_dir(sysfs)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    entries.sort();
    entries.into_iter().find_map(|entry| {
        let name = fs::read_to_string(sysfs.join(&entry).join("name")).ok()?;
        (name.trim_end_matches('\n') == wanted).then(|| entry.to_string_lossy().into_owned())
    })
}

/// Opens `path` for reading and writing: a Unix socket is connected to,
/// anything else (character device, FIFO) opened read-write.
///
/// # Errors
/// The path does not exist or cannot be opened or connected to.
pub fn open(path: &Path) -> io::Result<(PortReader, PortWriter)> {
    if fs::metadata(path)?.file_type().is_socket() {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        return Ok((Box::new(stream), Box::new(writer)));
    }
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let writer = file.try_clone()?;
    Ok((Box::new(file), Box::new(writer)))
}

/// Opens the port, waiting for it as long as it takes: without it the agent
/// has nothing to do. `explicit` is `--port`; `None` means discover the
/// virtio-serial port.
pub fn open_when_ready(explicit: Option<&Path>) -> (PortReader, PortWriter) {
    open_named_when_ready(explicit, ferry_agent_proto::PORT_NAME)
}

/// [`open_when_ready`] for the virtio-serial port named `name` (the shell
/// server's is [`ferry_agent_proto::shell::SHELL_PORT_NAME`]).
pub fn open_named_when_ready(explicit: Option<&Path>, name: &str) -> (PortReader, PortWriter) {
    let started = Instant::now();
    let mut complained = false;
    loop {
        let attempt = match explicit {
            Some(path) => open(path).map(|port| (path.to_path_buf(), port)),
            None => match find_port(Path::new(SYSFS_PORTS), name) {
                Some(dev) => {
                    let path = PathBuf::from("/dev").join(dev);
                    open(&path).map(|port| (path, port))
                }
                None => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no virtio-serial port named {name} under {SYSFS_PORTS}"),
                )),
            },
        };
        match attempt {
            Ok((path, port)) => {
                if complained {
                    info!("port {} is open", path.display());
                } else {
                    debug!("port {} is open", path.display());
                }
                return port;
            }
            Err(e) if !complained && started.elapsed() >= COMPLAIN_AFTER => {
                info!("still waiting for the port: {e}");
                complained = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::TempDir;

    #[test]
    fn finds_the_port_by_name() {
        let sysfs = TempDir::new("sysfs");
        for (dir, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "ferry.agent\n"),
            ("vport1p2", "ferry.agent.other\n"),
        ] {
            fs::create_dir(sysfs.path().join(dir)).unwrap();
            fs::write(sysfs.path().join(dir).join("name"), name).unwrap();
        }
        // A port without a name file (unnamed ports) is skipped.
        fs::create_dir(sysfs.path().join("vport0p1")).unwrap();
        assert_eq!(
            find_port(sysfs.path(), "ferry.agent").as_deref(),
            Some("vport1p1")
        );
        assert_eq!(find_port(sysfs.path(), "nope"), None);
        assert_eq!(
            find_port(&sysfs.path().join("missing"), "ferry.agent"),
            None
        );
    }

    #[test]
    fn opens_a_unix_socket() {
        use std::io::Write;
        let dir = TempDir::new("sock");
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (mut reader, mut writer) = open(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        writer.write_all(b"ping\n").unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping\n");
        peer.write_all(b"pong\n").unwrap();
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong\n");
    }
}
