//! QEMU versions: what ferry works around and what it can load.
//!
//! The version is read once from `qemu-system-x86_64 --version` and decides
//! two things: whether the TCG live-copy workaround applies (QEMU before
//! 9.0, see [`crate::vm::TCG_MEMORY_EXTRA_KIB`]), and whether a state saved
//! by another QEMU may be handed to this one. QEMU loads migration streams
//! from older releases (its device sections are versioned, new fields are
//! optional subsections) but not from newer ones, so a newer state is
//! refused before QEMU sees it, and an older one is tried.

use std::fmt;

/// A QEMU release, `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major release (7, 10, ...).
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Micro (bug-fix) release.
    pub micro: u32,
}

/// The first QEMU whose TCG dirty tracking stays exact through a live copy
/// of any RAM size ("physmem: Fix migration dirty bitmap coherency with TCG
/// memory access").
pub const TCG_DIRTY_SYNC_FIXED: QemuVersion = QemuVersion::new(9, 0, 0);

/// The first QEMU found to run a TCG guest's virtio-mmio disk in an
/// iothread: 7.2 refuses ("ioeventfd is required for iothread"), as it
/// enables ioeventfd only under KVM; 10.0 runs it (8.x and 9.x untried).
pub const TCG_DISK_IOTHREAD: QemuVersion = QemuVersion::new(10, 0, 0);

/// The oldest QEMU whose saved states ferry hands to a newer QEMU: the first
/// one ferry ran on (Debian bookworm's).
pub const OLDEST_LOADABLE: QemuVersion = QemuVersion::new(7, 2, 0);

impl QemuVersion {
    /// A version from its parts.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    /// Parses `7.2.22`, `10.0.2` or `9.1` (a missing micro is 0); `None`
    /// for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let micro = match parts.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(QemuVersion::new(major, minor, micro))
    }

    /// Whether TCG guests need [`crate::vm::TCG_MEMORY_EXTRA_KIB`] for a
    /// correct live copy on this QEMU.
    pub fn tcg_needs_extra_memory(self) -> bool {
        self < TCG_DIRTY_SYNC_FIXED
    }

    /// Whether this QEMU can run the disk in an iothread under `accel`
    /// (see [`TCG_DISK_IOTHREAD`]).
    pub fn disk_iothread(self, accel: ferry_engine::Accel) -> bool {
        match accel {
            ferry_engine::Accel::Kvm => true,
            ferry_engine::Accel::Tcg => self >= TCG_DISK_IOTHREAD,
        }
    }

    /// Why this QEMU may not load a state `saved` by another, or `None` if
    /// it may try. Releases differing only in the micro number share their
    /// migration format.
    pub fn cannot_load(self, saved: QemuVersion) -> Option<String> {
        if (saved.major, saved.minor) > (self.major, self.minor) {
            Some(format!(
                "QEMU {saved}, newer than this host's QEMU {self}, which cannot load a newer \
                 QEMU's state; resume it where QEMU {}.{} or later runs",
                saved.major, saved.minor
            ))
        } else if saved < OLDEST_LOADABLE {
            Some(format!(
                "QEMU {saved} (this host has {self}; states from QEMU before \
                 {OLDEST_LOADABLE} are not loaded)"
            ))
        } else {
            None
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_prints() {
        assert_eq!(
            QemuVersion::parse("7.2.22"),
            Some(QemuVersion::new(7, 2, 22))
        );
        assert_eq!(
            QemuVersion::parse("10.0.2"),
            Some(QemuVersion::new(10, 0, 2))
        );
        assert_eq!(QemuVersion::parse("9.1"), Some(QemuVersion::new(9, 1, 0)));
        assert_eq!(QemuVersion::parse("0.9.0"), Some(QemuVersion::new(0, 9, 0)));
        for bad in ["", "10", "ten.0", "1.2.3.4", "7.2.x"] {
            assert_eq!(QemuVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_tcg_disk_gets_an_iothread_only_where_qemu_runs_one() {
        use ferry_engine::Accel;
        let (old, new) = (QemuVersion::new(7, 2, 22), QemuVersion::new(10, 0, 2));
        assert!(!old.disk_iothread(Accel::Tcg));
        assert!(new.disk_iothread(Accel::Tcg));
        assert!(old.disk_iothread(Accel::Kvm) && new.disk_iothread(Accel::Kvm));
    }

    #[test]
    fn numbers_compare_as_numbers() {
        assert!(QemuVersion::new(10, 0, 0) > QemuVersion::new(9, 2, 4));
        assert!(QemuVersion::new(7, 2, 22).tcg_needs_extra_memory());
        assert!(QemuVersion::new(8, 2, 9).tcg_needs_extra_memory());
        assert!(!QemuVersion::new(9, 0, 0).tcg_needs_extra_memory());
        assert!(!QemuVersion::new(10, 0, 2).tcg_needs_extra_memory());
    }

    #[test]
    fn older_states_load_newer_ones_do_not() {
        let v10 = QemuVersion::new(10, 0, 2);
        let v72 = QemuVersion::new(7, 2, 22);
        assert_eq!(v10.cannot_load(v72), None);
        assert_eq!(v10.cannot_load(QemuVersion::new(10, 0, 7)), None);
        assert_eq!(v72.cannot_load(QemuVersion::new(7, 2, 15)), None);
        let newer = v72.cannot_load(v10).unwrap();
        assert!(newer.contains("QEMU 10.0.2, newer than"), "{newer}");
        let ancient = v10.cannot_load(QemuVersion::new(0, 9, 0)).unwrap();
        assert!(ancient.starts_with("QEMU 0.9.0 "), "{ancient}");
    }
}
