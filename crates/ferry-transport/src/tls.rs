//! TLS for ferry's HTTP servers and clients (rustls, with ring: the
//! registry, the manager's API and its workers' link): the certificates of
//! a test cluster ([`init`], `ferry tls init`), a listener's configuration
//! ([`ServerTls`]: `--tls-cert`, `--tls-key`, `--client-ca`) and a client's
//! ([`ClientTls`]: `--ca`, `--client-cert`, `--client-key`).
//!
//! Without TLS, a package's bytes (guest memory) and the bearer token
//! travel in clear; with it, the client checks the server's certificate
//! against its CA (and the server, with `--client-ca`, the client's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// Why TLS could not be set up. Each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read as PEM.
    #[error("{path}: {detail}: give a PEM {what} (e.g. from `ferry tls init DIR`)")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// Certificate or key.
        what: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the combination (a key that does not match its
    /// certificate, an unusable CA).
    #[error(
        "the TLS configuration was refused: {0}: check that the key belongs to the certificate"
    )]
    Config(String),
    /// `tls init` found files it would overwrite.
    #[error("{0} exists: `ferry tls init` never overwrites keys; pick an empty directory")]
    Exists(PathBuf),
    /// `tls init` could not write.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed (a `--san` that is not a DNS name or
    /// an IP address).
    #[error("cannot make the certificates: {0}: each --san is a DNS name or an IP address")]
    Generate(String),
}

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// The CA's certificate (give it to clients as `--ca`, to servers as
    /// `--client-ca`).
    pub ca_cert: PathBuf,
    /// The server's certificate (`--tls-cert`).
    pub server_cert: PathBuf,
    /// The server's key, 0600 (`--tls-key`).
    pub server_key: PathBuf,
    /// A client certificate (`--client-cert`).
    pub client_cert: PathBuf,
    /// Its key, 0600 (`--client-key`).
    pub client_key: PathBuf,
    /// The names the server certificate is valid for.
    pub names: Vec<String>,
}

/// Makes a small CA and a server and a client certificate signed by it in
/// `dir` (created 0700): `ca.crt`, `server.crt`, `server.key` (valid for
/// `localhost`, `127.0.0.1` and each of `sans`), `client.crt`,
/// `client.key`. Keys are 0600. The CA's own key is not kept: a test
/// cluster that needs more certificates runs `init` again.
///
/// # Errors
/// [`TlsError::Exists`] if any of the files exists; [`TlsError::Generate`]
/// for a bad name; [`TlsError::Write`].
pub fn init(dir: &Path, sans: &[String]) -> Result<TlsFiles, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let files = TlsFiles {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        names: ["localhost".to_string(), "127.0.0.1".to_string()]
            .into_iter()
            .chain(sans.iter().cloned())
            .collect(),
    };
    for f in [
        &files.ca_cert,
        &files.server_cert,
        &files.server_key,
        &files.client_cert,
        &files.client_key,
    ] {
        if f.exists() {
            return Err(TlsError::Exists(f.clone()));
        }
    }
    for name in sans {
        let ok = name.parse::<std::net::IpAddr>().is_ok()
            || (!name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }));
        if !ok {
            return Err(TlsError::Generate(format!("--san {name:?} is not a name")));
        }
    }
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.distinguished_name
        .push(DnType::CommonName, "ferry test cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;

    let server_key = KeyPair::generate().map_err(gen)?;
    let mut server = CertificateParams::new(files.names.clone()).map_err(gen)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "ferry server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(gen)?;

    let client_key = KeyPair::generate().map_err(gen)?;
    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    client
        .distinguished_name
        .push(DnType::CommonName, "ferry client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client
        .signed_by(&client_key, &ca_cert, &ca_key)
        .map_err(gen)?;

    private_dir(dir)?;
    write(&files.ca_cert, &ca_cert.pem(), 0o644)?;
    write(&files.server_cert, &server_cert.pem(), 0o644)?;
    write(&files.server_key, &server_key.serialize_pem(), 0o600)?;
    write(&files.client_cert, &client_cert.pem(), 0o644)?;
    write(&files.client_key, &client_key.serialize_pem(), 0o600)?;
    Ok(files)
}

fn private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `text` into a new file of mode `mode` (never replacing one).
fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |detail: String| TlsError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::BadPem {
        path: path.to_path_buf(),
        what: "private key",
        detail: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS listener's configuration.
#[derive(Clone)]
pub struct ServerTls(pub(crate) Arc<rustls::ServerConfig>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// From PEM files: the certificate chain, its key, and (to require
    /// client certificates) the CA that signs them.
    ///
    /// # Errors
    /// [`TlsError::BadPem`] or [`TlsError::Config`].
    pub fn from_files(
        cert: &Path,
        key_file: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, TlsError> {
        let chain = certs(cert)?;
        let key = key(key_file)?;
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c).map_err(cfg)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(cfg)?;
        Ok(ServerTls(Arc::new(config)))
    }
}

/// A client's TLS settings for `https://` registries: the CA to trust
/// instead of the public roots, and a client certificate for servers that
/// ask for one. Paths only, so that it can travel in a detached spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    /// Trust this CA (PEM) instead of the public roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Present this certificate (PEM)...
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// ...with this key (PEM).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// The settings as ureq takes them, the files read and checked now.
    ///
    /// # Errors
    /// [`TlsError::BadPem`] for a file that cannot be read.
    pub fn ureq_config(&self) -> Result<ureq::tls::TlsConfig, TlsError> {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
        let mut b = TlsConfig::builder().provider(TlsProvider::Rustls);
        if let Some(ca) = &self.ca {
            let roots = certs(ca)?
                .into_iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect::<Vec<_>>();
            b = b.root_certs(RootCerts::Specific(Arc::new(roots)));
        }
        if let (Some(cert), Some(key_file)) = (&self.client_cert, &self.client_key) {
            let chain = certs(cert)?
                .into_iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect::<Vec<_>>();
            let pem = std::fs::read(key_file).map_err(|e| TlsError::BadPem {
                path: key_file.clone(),
                what: "private key",
                detail: e.to_string(),
            })?;
            let key = PrivateKey::from_pem(&pem).map_err(|e| TlsError::BadPem {
                path: key_file.clone(),
                what: "private key",
                detail: e.to_string(),
            })?;
            b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        Ok(b.build())
    }
}

/// Whether a ureq call failed in its TLS handshake (an unknown CA, a
/// certificate for another name or out of date, a server that wants a
/// client certificate): an error to report with the fix, not to retry.
pub fn is_tls_failure(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Rustls(_) => true,
        ureq::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => false,
    }
}

/// A server's TLS files (`--tls-cert`, `--tls-key`, `--client-ca`) as
/// paths, so that they can travel in a detached spec; [`ServerTlsFiles::load`]
/// reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// Require client certificates signed by this CA (PEM).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// The listener's configuration, the files read and checked now.
    ///
    /// # Errors
    /// As [`ServerTls::from_files`].
    pub fn load(&self) -> Result<ServerTls, TlsError> {
        ServerTls::from_files(&self.cert, &self.key, self.client_ca.as_deref())
    }
}

/// A migration client's TLS (`ferry peer --from HOST:PORT --ca FILE`),
/// loaded: the peer's certificate must be signed by the given CA (never
/// the public roots: peers of one cluster share a private CA) and name the
/// address dialled; a client certificate is presented when asked for.
#[derive(Clone)]
pub struct PeerClientTls(pub(crate) Arc<rustls::ClientConfig>);

impl std::fmt::Debug for PeerClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerClientTls")
    }
}

impl ClientTls {
    /// The settings for a migration peer, the files read and checked now.
    ///
    /// # Errors
    /// [`TlsError::Config`] without `ca` (a peer is checked against the
    /// cluster's CA, never the public roots), [`TlsError::BadPem`].
    pub fn peer(&self) -> Result<PeerClientTls, TlsError> {
        let Some(ca) = &self.ca else {
            return Err(TlsError::Config(
                "TLS to a peer needs --ca FILE (the CA that signed its --tls-cert)".into(),
            ));
        };
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots.add(c).map_err(cfg)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_root_certificates(roots);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key_file)) => builder
                .with_client_auth_cert(certs(cert)?, key(key_file)?)
                .map_err(cfg)?,
            _ => builder.with_no_client_auth(),
        };
        Ok(PeerClientTls(Arc::new(config)))
    }
}
