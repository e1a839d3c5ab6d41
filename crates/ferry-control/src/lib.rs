//! ferry's control plane: a manager that places, moves and heals VMs
//! across hosts, the worker that runs them on each host through the
//! runtime library, and a client for the manager's API.
//!
//! - [`api`]: the manager's API types (version 1).
//! - [`link`]: the manager–worker link (version 1).
//! - [`manager`]: `ferry manager`: the API, placement, leases, the store.
//! - [`worker`]: `ferry worker`: runs VMs as detached peers.
//! - [`client`]: HTTP clients for the link and the API (`ferry cluster`).
//! - [`store`]: where the manager keeps its state; [`etcd`] for several
//!   managers with a leader.
//!
//! `docs/control-plane.md` documents the routes and the lifecycle.
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod etcd;
pub mod link;
pub mod manager;
pub mod store;
pub mod worker;
