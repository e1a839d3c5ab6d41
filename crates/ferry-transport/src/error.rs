use std::net::SocketAddr;
use std::path::PathBuf;

use ferry_package::{PackageError, SectionKind};

/// Everything that can go wrong serving or fetching a package over HTTP. Each
/// message says what failed and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    // ---- registry (server) ----
    /// The registry was given no package.
    #[error("no package to serve: pass --package FILE (once per package)")]
    NoPackages,
    /// A package to serve failed to open or its header or table are damaged.
    #[error("cannot serve a package: {0}")]
    OpenPackage(#[source] PackageError),
    /// A package path has no file name usable in a URL.
    #[error("{0}: a served package needs a UTF-8 file name (its name in the registry): rename it")]
    BadPackageName(PathBuf),
    /// Two packages would be reachable under one name.
    #[error("two packages are named {name} ({} and {}): the registry serves packages by file name; rename one", first.display(), second.display())]
    DuplicateName {
        /// The file name both have.
        name: String,
        /// The first path given.
        first: PathBuf,
        /// The second path given.
        second: PathBuf,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}: pick another address with --listen (is another registry running there?)")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The async runtime or a signal handler could not be set up.
    #[error("cannot start the registry's {what}: {source}")]
    Setup {
        /// What could not be set up.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("the registry on {addr} failed: {source}")]
    Serve {
        /// The address it listened on.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A token was refused before any request: too short, empty or with
    /// characters a header cannot carry.
    #[error("{0}")]
    BadToken(#[from] crate::TokenError),

    /// TLS could not be set up (a certificate or key file, `tls init`).
    #[error(transparent)]
    Tls(#[from] crate::TlsError),

    // ---- remote packages (client) ----
    /// The URL cannot be fetched from.
    #[error("{url} is not a usable package URL ({detail}): give http://HOST:PORT/ (a registry serving one package), http://HOST:PORT/packages/NAME, or the URL of a package file")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
    /// No connection could be made, even after retrying.
    #[error("cannot reach {url} after {attempts} attempts ({detail}): check the address and that the server is running")]
    Connect {
        /// The URL.
        url: String,
        /// How many times it was tried.
        attempts: u32,
        /// The last error.
        detail: String,
    },
    /// A request failed before an answer came, for another reason than the
    /// connection (a timeout, a malformed answer).
    #[error("{url}: the request for {what} failed ({detail}): check that the server is running and serves HTTP")]
    Request {
        /// The URL.
        url: String,
        /// What was asked for.
        what: String,
        /// The underlying error.
        detail: String,
    },
    /// The TLS handshake failed: an unknown CA, a certificate for another
    /// name or out of date, or a server that wants a client certificate.
    #[error("{url}: the TLS handshake failed ({detail}): pass --ca FILE with the registry's CA (and --client-cert/--client-key if it asks for one); its certificate must hold the name used and be in date")]
    TlsRefused {
        /// The URL.
        url: String,
        /// rustls' reason.
        detail: String,
    },
    /// The server wants a token, or refused the one sent.
    #[error("{url}: 401 Unauthorized: {}", if *token_sent { "the registry refused the token: check --token or --token-file" } else { "the registry needs a token: pass --token or --token-file" })]
    Unauthorized {
        /// The URL.
        url: String,
        /// Whether a token was sent.
        token_sent: bool,
    },
    /// The server has nothing at the URL.
    #[error("{url}: 404 Not Found: check the URL (a registry lists its packages at /)")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// Any other unexpected HTTP status.
    #[error(
        "{url}: the server answered {status} to the request for {what}: check the server's logs"
    )]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// What was asked for.
        what: String,
    },
    /// The server sent the whole file where a byte range was asked for.
    #[error("{url}: the server ignored the Range request for {what} (it answered {status} with the whole file): serve the package with `ferry registry` or a server that supports range requests (nginx, S3; Python's http.server does not)")]
    RangeUnsupported {
        /// The URL.
        url: String,
        /// The HTTP status code (200).
        status: u16,
        /// What was asked for.
        what: String,
    },
    /// A response does not fit the request (wrong Content-Range, length...).
    #[error("{url}: unexpected answer to the request for {what} ({detail}): the server does not serve byte ranges correctly")]
    BadResponse {
        /// The URL.
        url: String,
        /// What was asked for.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// The connection broke while a response body was read.
    #[error("{url}: the transfer of {what} broke after {got} of {expected} bytes ({detail}): the server went away; check it is running and retry")]
    Interrupted {
        /// The URL.
        url: String,
        /// What was being read.
        what: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        expected: u64,
        /// The underlying error.
        detail: String,
    },
    /// The file on the server is not the one opened.
    #[error(
        "{url}: the package changed on the server while it was read ({detail}): open it again"
    )]
    Changed {
        /// The URL.
        url: String,
        /// What differs.
        detail: String,
    },
    /// A registry root URL did not answer with a package listing.
    #[error("{url} did not answer with a ferry registry listing ({detail}): give the package's own URL (http://HOST:PORT/packages/NAME or the file's URL)")]
    NotARegistry {
        /// The URL.
        url: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// A registry root URL serves no package.
    #[error("the registry at {url} serves no package")]
    EmptyRegistry {
        /// The URL.
        url: String,
    },
    /// A registry root URL serves several packages: which one is meant?
    #[error("the registry at {url} serves {} packages ({}): pick one with {}packages/NAME", names.len(), names.join(", "), url_dir(url))]
    AmbiguousRegistry {
        /// The URL.
        url: String,
        /// The packages' names.
        names: Vec<String>,
    },
    /// A chunk fetched from the server does not match its sha256.
    #[error("{url}: chunk {index} of section {section} (file offset {offset}) is corrupt: the copy on the server is damaged; rebuild the package or fetch it from elsewhere")]
    ChunkCorrupt {
        /// The package's URL.
        url: String,
        /// The section.
        section: SectionKind,
        /// The chunk's index in the section.
        index: usize,
        /// Where the chunk's stored bytes start in the package file.
        offset: u64,
    },
    /// The package's header or table is damaged, unsupported, or the caller
    /// asked for something it does not hold (the message names the URL).
    #[error(transparent)]
    Package(#[from] PackageError),
}

/// `url` with a trailing slash, for "append packages/NAME" hints.
fn url_dir(url: &str) -> String {
    if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    }
}
