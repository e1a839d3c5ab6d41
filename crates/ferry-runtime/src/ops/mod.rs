//! What each `ferry` command does, one module per verb, as library calls
//! that return data and report progress as [`crate::Event`]s. The binary
//! only parses arguments, renders events and maps errors to exit codes;
//! daemons and tests call the same functions.
//!
//! | command | module |
//! |---|---|
//! | `ferry boot` | [`boot`] |
//! | `ferry package` | [`package`] |
//! | `ferry run` | [`run`] |
//! | `ferry peer` | [`peer`] |
//! | `ferry exec` | [`exec`] |
//! | `ferry inspect` | [`inspect`] |
//! | `ferry up`, `run --detach` | [`crate::fleet`] |
//! | `ferry ps` | [`crate::fleet::list`] |
//! | `ferry stop`, `start`, `restart`, `rm`, `clean`, `logs` | [`crate::fleet`] |
//! | `ferry supervise` (hidden) | [`crate::detach::supervise`] |

pub mod boot;
pub mod exec;
pub mod inspect;
pub mod package;
pub mod peer;
pub mod run;

pub use boot::{boot, BootOptions, BootSource};
pub use exec::{exec, ExecResult};
pub use inspect::{inspect, Inspection};
pub use package::{package, PackageOptions, Packaged};
pub use peer::{peer, PeerOptions};
pub use run::{run, RunOptions};
