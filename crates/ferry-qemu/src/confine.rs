//! How ferry confines each QEMU process: QEMU's own seccomp sandbox, and,
//! when ferry runs as root, an unprivileged user and a cgroup of its own
//! (`docs/security.md`, "Confined engine").
//!
//! Confinement is on by default; `FERRY_CONFINE=0` turns all of it off, for
//! debugging QEMU itself (e.g. to attach a debugger or let it spawn).

/// The environment variable that turns confinement off (`0`).
pub const CONFINE_ENV: &str = "FERRY_CONFINE";

/// What confines the QEMU processes of one engine.
#[derive(Debug, Clone)]
pub struct Confine {
    /// `-sandbox` with [`crate::vm::SANDBOX`].
    pub sandbox: bool,
}

impl Confine {
    /// No confinement at all.
    pub fn off() -> Self {
        Confine { sandbox: false }
    }

    /// From `$FERRY_CONFINE` (anything but `0`, or unset: on).
    pub fn from_env() -> Self {
        if std::env::var(CONFINE_ENV).is_ok_and(|v| v == "0") {
            return Self::off();
        }
        Confine { sandbox: true }
    }
}
