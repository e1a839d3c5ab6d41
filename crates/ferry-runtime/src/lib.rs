//! Running ferry VMs: the layer between the `ferry` commands and an
//! [`ferry_engine::Engine`].
//!
//! - [`vmdir`]: every VM's name and state directory (locked while it runs).
//! - [`agent`]: the host side of the guest agent protocol.
//! - [`control`]: the per-VM control socket other commands talk to.
//! - [`supervisor`]: a running VM with all of the above, cleaned up on drop.
//! - [`ops`]: what each command does.
#![warn(missing_docs)]

pub mod agent;
mod cache;
pub mod control;
mod error;
pub mod ops;
pub mod package;
mod paths;
pub mod peer;
pub mod supervisor;
pub mod vmdir;

pub use error::RuntimeError;
pub use paths::Paths;
