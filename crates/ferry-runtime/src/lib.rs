//! Running ferry VMs: the layer between the `ferry` commands and an
//! [`ferry_engine::Engine`].
//!
//! - [`vmdir`]: every VM's name and state directory (locked while it runs).
//! - [`agent`]: the host side of the guest agent protocol.
//! - [`control`]: the per-VM control socket other commands talk to.
//! - [`supervisor`]: a running VM with all of the above, cleaned up on drop.
//! - [`ops`]: what each command does.
//! - [`detach`]: VMs owned by a supervisor process of their own.
//! - [`record`]: what a detached VM's directory says about it.
//! - [`fleet`]: `ferry up`, `ps`, `stop`, `start`, `restart`, `rm`, `clean`, `logs`.
#![warn(missing_docs)]

pub mod agent;
mod cache;
pub mod control;
pub mod detach;
mod error;
pub mod fleet;
pub mod ops;
pub mod package;
mod paths;
pub mod peer;
pub mod peer_detach;
pub mod record;
pub mod supervisor;
pub mod vmdir;

pub use error::RuntimeError;
pub use paths::Paths;
