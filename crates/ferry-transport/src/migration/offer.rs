//! What a source offers a destination: the VM's description ([`VmOffer`]),
//! typed on both ends and checked on receipt ([`VmOffer::validate`]).
//!
//! The offer comes from another machine, so nothing in it is trusted: a
//! blob digest becomes a file name in the destination's cache, and the VM's
//! name a directory. Fields a newer source adds are ignored; a field this
//! version needs and does not find refuses the offer, naming the field.

use ferry_package::VmMeta;
use serde::{Deserialize, Serialize};

use super::MigrationError;

/// What a source offers a destination: sent in
/// [`SourceMsg::Offer`](super::SourceMsg::Offer), returned by
/// [`connect`](super::connect) once [validated](Self::validate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmOffer {
    /// The VM's name on the source (the destination's default name for it).
    pub name: String,
    /// Its metadata, as a package would carry it: what the destination
    /// checks (memory, engine, CPU) before it starts anything.
    pub meta: VmMeta,
    /// The disk's size in bytes: the destination makes an empty disk of
    /// this size for the source's engine to copy into.
    pub disk_size: u64,
    /// The kernel, fetched only if the destination's cache lacks it.
    pub kernel: Blob,
    /// The initramfs, fetched only if the destination's cache lacks it.
    pub initramfs: Blob,
}

/// A file the destination needs, named by content: the destination caches
/// it under its digest, and checks what it receives against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// SHA-256, 64 lowercase hex digits.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

impl VmOffer {
    /// Checks what the destination will use as names and sizes: the VM's
    /// name is a valid VM name (1 to 63 characters of `a-z 0-9 - _ .`,
    /// starting with a letter or digit), each blob digest is exactly 64
    /// lowercase hex digits (never a path into the cache), and the disk is
    /// not empty.
    ///
    /// # Errors
    /// [`MigrationError::Protocol`], saying which field is wrong.
    pub fn validate(&self) -> Result<(), MigrationError> {
        let bad = |what: String| Err(MigrationError::Protocol(format!("the offer {what}")));
        if !valid_name(&self.name) {
            return bad(format!(
                "names the VM {}, which is not a VM name (1 to 63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit)",
                shown(&self.name)
            ));
        }
        for (what, blob) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !valid_sha256(&blob.sha256) {
                return bad(format!(
                    "gives the {what} digest {}, which is not a SHA-256 (64 lowercase hex digits)",
                    shown(&blob.sha256)
                ));
            }
            if blob.size == 0 || blob.size > MAX_BLOB_SIZE {
                return bad(format!(
                    "gives the {what} a size of {} bytes (1 byte to {MAX_BLOB_SIZE})",
                    blob.size
                ));
            }
        }
        if self.disk_size == 0 {
            return bad("gives a disk of 0 bytes".into());
        }
        Ok(())
    }
}

/// The largest kernel or initramfs a destination fetches: 1 GiB (a
/// hostile source cannot fill the destination's disk with one).
pub const MAX_BLOB_SIZE: u64 = 1 << 30;

/// The VM name rule of the runtime (`validate_name`), repeated here so that
/// an offer is refused before anything is made from it.
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

fn valid_sha256(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A string from the peer, quoted and cut short for a message.
pub(super) fn shown(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{:?}…", &s[..end]),
        None => format!("{s:?}"),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An offer as a source sends it, as JSON.
    pub(crate) fn offer_json() -> serde_json::Value {
        serde_json::json!({
            "name": "redis-1a2b",
            "meta": {
                "ferry_version": "0.1.0",
                "written_unix": 1700000000u64,
                "generation": 0,
                "provenance": {
                    "engine": "qemu", "engine_version": "8.2.2", "cpu_model": "max",
                    "accel": "kvm", "memory_mib": 512, "cpus": 1
                },
                "recipe": "redis",
                "cmdline": "console=ttyS0",
                "network": {
                    "interface": "eth0", "guest_address": "172.100.100.2",
                    "prefix_len": 30, "gateway": "172.100.100.1"
                },
                "liveness": {"kind": "tcp", "port": 6379}
            },
            "disk_size": 1u64 << 30,
            "kernel": {"sha256": "ab".repeat(32), "size": 9_000_000},
            "initramfs": {"sha256": "0123456789abcdef".repeat(4), "size": 4_000_000}
        })
    }

    pub(crate) fn offer() -> VmOffer {
        serde_json::from_value(offer_json()).unwrap()
    }

    fn refused(edit: impl FnOnce(&mut VmOffer)) -> String {
        let mut o = offer();
        edit(&mut o);
        match o.validate() {
            Err(MigrationError::Protocol(msg)) => msg,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_good_offer_passes() {
        offer().validate().unwrap();
        let mut o = offer();
        o.name = format!("a{}", "-_.z9".repeat(12))
            .chars()
            .take(63)
            .collect();
        o.validate().unwrap();
    }

    #[test]
    fn a_path_is_not_a_digest() {
        for digest in [
            "../../etc/passwd".to_string(),
            format!("../{}", "a".repeat(61)),
            format!("{}/", "a".repeat(63)),
            "AB".repeat(32),
            "a".repeat(63),
            "a".repeat(65),
            String::new(),
            format!("{}é", "a".repeat(62)),
        ] {
            let msg = refused(|o| o.kernel.sha256 = digest.clone());
            assert!(msg.contains("kernel digest"), "{msg}");
            let msg = refused(|o| o.initramfs.sha256 = digest.clone());
            assert!(msg.contains("initramfs digest"), "{msg}");
        }
        let msg = refused(|o| o.kernel.sha256 = "../../etc/passwd".into());
        assert_eq!(
            msg,
            "the offer gives the kernel digest \"../../etc/passwd\", which is not a SHA-256 (64 lowercase hex digits)"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for name in [
            "",
            "-x",
            ".x",
            "Redis",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(64),
        ] {
            let msg = refused(|o| o.name = name.to_string());
            assert!(msg.contains("not a VM name"), "{name}: {msg}");
        }
        let msg = refused(|o| o.name = "x".repeat(10_000));
        assert!(msg.len() < 300, "the name is cut short: {msg}");
    }

    #[test]
    fn blob_sizes_are_bounded() {
        let msg = refused(|o| o.kernel.size = 0);
        assert!(msg.contains("kernel a size of 0 bytes"), "{msg}");
        let msg = refused(|o| o.initramfs.size = MAX_BLOB_SIZE + 1);
        assert!(msg.contains("initramfs a size of"), "{msg}");
    }

    #[test]
    fn an_empty_disk_is_refused() {
        let msg = refused(|o| o.disk_size = 0);
        assert!(msg.contains("disk of 0 bytes"), "{msg}");
    }
}
