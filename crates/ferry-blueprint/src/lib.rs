//! Blueprints: everything needed to boot one kind of ferry guest.
//!
//! A blueprint is a directory with `kernel`, `initramfs`, `disk.ext4` and
//! `blueprint.toml` (the [`Manifest`]). It is built from a [`Recipe`] (plain
//! TOML, so users add recipes without touching Rust) by [`build()`], using only
//! Debian's package registries: the kernel comes from Debian's cloud kernel
//! package, the root file system from busybox or debootstrap, and the disk is
//! made with `mkfs.ext4 -d`, without mounting anything.
#![warn(missing_docs)]

mod binaries;
mod builder;
mod cpio;
mod error;
mod hash;
mod kernel;
mod manifest;
mod modules;
pub mod progress;
mod recipe;
mod rootfs;
mod tools;

pub use binaries::{HostBinaries, STATIC_TARGET_SUBDIR};
pub use builder::{build, BuildOptions};
pub use error::BlueprintError;
pub use hash::sha256_file;
pub use manifest::{Blueprint, FileEntry, Manifest, NetworkConfig, FORMAT_VERSION};
pub use recipe::{Defaults, Recipe, RootfsSpec};

/// Whether `path` is a static x86-64 executable (runs in any guest).
pub fn is_static_executable(path: &std::path::Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| rootfs::is_dynamic_elf(&b))
        == Some(false)
}
