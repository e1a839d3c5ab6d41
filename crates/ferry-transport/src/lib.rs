//! Moving ferry packages over HTTP.
//!
//! A package is built to be fetched piecewise: a fixed header, a checksummed
//! section table, and chunks that each carry their own sha256
//! (`docs/package-format.md`). This crate has the two ends of that:
//!
//! - [`Registry`]: a read-only HTTP server for package files (`ferry
//!   registry`), with byte ranges, ETags and an optional bearer token.
//! - [`RemotePackage`]: a client that reads a package from a registry or any
//!   HTTP server that supports range requests, one chunk per request, and
//!   verifies every chunk against the package's own hashes.
//!
//! Integrity never depends on the server or the link: a peer trusts the
//! header and table only after checking their checksums, and a chunk only
//! after checking its sha256. The token keeps strangers from reading
//! packages; it is sent in clear over `http://` (see `docs/registry.md`).
//!
//! ferry's other code is blocking, so both ends have blocking entry points:
//! the server builds its own tokio runtime ([`Registry::run_until`]
//! and [`Registry::spawn`], each stopped by the caller: the library
//! installs no signal handlers) and the client uses a blocking HTTP client.
//!
//! ```no_run
//! use ferry_transport::{Registry, RegistryConfig, RemotePackage};
//! use ferry_package::SectionKind;
//!
//! # fn main() -> Result<(), ferry_transport::TransportError> {
//! let registry = Registry::bind(RegistryConfig {
//!     packages: vec!["vm.ferry".into()],
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     token: None,
//! })?
//! .spawn()?;
//! let remote = RemotePackage::open(&registry.url(), None)?;
//! let config = remote.read_chunk(SectionKind::Config, 0)?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod client;
mod error;
mod listener;
pub mod migration;
pub mod range;
mod serve;
mod server;
mod thread;
mod tls;
mod token;

pub use client::RemotePackage;
pub use error::TransportError;
pub use listener::{CappedListener, Conn, HEADER_DEADLINE, TLS_HANDSHAKE_DEADLINE};
pub use serve::{serve, serve_with_deadline};
pub use server::{
    ListedPackage, Listing, Registry, RegistryConfig, RunningRegistry, ServedPackage,
    MAX_REGISTRY_CONNECTIONS,
};
pub use thread::{ServerThread, StopSignal};
pub use tls::{
    init as tls_init, is_tls_failure, ClientTls, PeerClientTls, ServerTls, ServerTlsFiles,
    TlsError, TlsFiles,
};
pub use token::{Token, TokenError, MIN_TOKEN_LEN};
