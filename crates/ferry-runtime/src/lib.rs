//! Running ferry VMs, as a library: the layer between the `ferry` commands
//! (or a daemon, or a test) and an [`ferry_engine::Engine`]. It returns
//! data, reports progress as typed [`Event`]s to a sink the caller gives,
//! takes a [`Cancel`] from the caller for long work, and never prints,
//! installs a signal handler or exits the process.
//!
//! - [`ops`]: what each command does, one module per verb.
//! - [`start`]: the one start pipeline (a plan from any source, executed
//!   one way).
//! - [`owner`]: the one owner of a running VM (cancel, stop, migrations,
//!   fleets), in the foreground or detached.
//! - [`save`]: the one save path (every package written from a VM).
//! - [`detach`]: VMs owned by a supervisor process of their own.
//! - [`fleet`]: `ferry up`, `ps`, `stop`, `start`, `restart`, `rm`, `clean`, `logs`.
//! - [`vm`]: a running VM and the resources it holds.
//! - [`vmdir`], [`record`], [`control`], [`agent`]: its directory, its
//!   record, its control socket, its guest agent.
//! - [`events`]: events and cancellation.
#![warn(missing_docs)]

pub mod agent;
mod cache;
pub mod control;
pub mod detach;
pub mod error;
pub mod events;
pub mod fleet;
pub mod guest_errors;
pub mod locks;
pub mod ops;
pub mod owner;
pub mod package_meta;
mod paths;
pub mod record;
pub mod save;
pub mod shell;
pub mod start;
pub mod vm;
pub mod vmdir;

pub use error::{
    ExitClass, FileError, FleetError, MigrateError, NameError, RuntimeError, StartError, VmError,
};
pub use events::{Cancel, Event, EventSink};
pub use package_meta::PackageMeta;
pub use paths::Paths;
pub use save::SaveError;
