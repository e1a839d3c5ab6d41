//! TLS on the registry with the certificates of `tls init`: a client that
//! trusts the CA reads a package; one that does not, one that reaches the
//! server under a name its certificate lacks, and plain HTTP are refused;
//! with `--client-ca`, a client without its certificate is refused. Keys
//! are 0600. Each check fails without TLS on the listener (every request
//! would then be plain HTTP and the https:// client would fail the
//! handshake instead of reading the package).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use ferry_package::Package;
use ferry_transport::{
    tls_init, ClientTls, Registry, RegistryConfig, RemotePackage, RunningRegistry, ServerTls,
    TlsError,
};

fn assert_same_as_local(remote: &RemotePackage, local: &Package) {
    assert_eq!(remote.index().table_sha256(), local.index().table_sha256());
    for s in local.sections() {
        for i in 0..s.chunk_count() {
            assert_eq!(
                remote.read_chunk(s.kind, i).unwrap(),
                local.read_chunk(s.kind, i).unwrap()
            );
        }
    }
}

fn one_line(e: &ferry_transport::TransportError) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

fn serve_tls(pkg: &Path, listen: &str, tls: ServerTls) -> RunningRegistry {
    Registry::bind(RegistryConfig {
        packages: vec![pkg.to_path_buf()],
        listen: listen.parse().unwrap(),
        token: None,
    })
    .unwrap()
    .with_tls(tls)
    .spawn()
    .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn tls_init_writes_a_ca_and_private_keys_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let files = tls_init(&out, &["reg.example".into(), "10.0.0.7".into()]).unwrap();
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&files.server_key), 0o600);
    assert_eq!(mode(&files.client_key), 0o600);
    assert_eq!(
        files.names,
        ["localhost", "127.0.0.1", "reg.example", "10.0.0.7"]
    );
    for f in [&files.ca_cert, &files.server_cert, &files.client_cert] {
        assert!(std::fs::read_to_string(f)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
    }
    let e = tls_init(&out, &[]).unwrap_err();
    assert!(matches!(e, TlsError::Exists(_)), "{e}");
    let e = tls_init(&dir.path().join("x"), &["not a name".into()]).unwrap_err();
    assert!(matches!(e, TlsError::Generate(_)), "{e}");
}

#[test]
fn a_tls_registry_serves_only_clients_that_trust_it() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = make_package(dir.path(), "a.ferry", 1);
    let f = tls_init(&dir.path().join("tls"), &[]).unwrap();
    let tls = ServerTls::from_files(&f.server_cert, &f.server_key, None).unwrap();
    let reg = serve_tls(&pkg, "127.0.0.1:0", tls.clone());
    let port = reg.local_addr().port();
    let trust = ClientTls {
        ca: Some(f.ca_cert.clone()),
        ..ClientTls::default()
    };
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}/packages/a.ferry");
        let remote = RemotePackage::open_with(&url, None, Some(&trust)).unwrap();
        assert_same_as_local(&remote, &Package::open(&pkg).unwrap());
    }
    let url = format!("https://127.0.0.1:{port}/packages/a.ferry");
    // The public roots do not know this CA.
    let e = RemotePackage::open_with(&url, None, None).unwrap_err();
    assert!(
        matches!(e, ferry_transport::TransportError::TlsRefused { .. }),
        "{}",
        one_line(&e)
    );
    assert!(one_line(&e).contains("pass --ca FILE"), "{}", one_line(&e));
    // Plain HTTP to a TLS listener gets no answer.
    let e = RemotePackage::open(&format!("http://127.0.0.1:{port}/packages/a.ferry"), None)
        .unwrap_err();
    assert!(!one_line(&e).is_empty());
    // A name the certificate does not hold (127.0.0.2 is loopback too).
    let other = serve_tls(&pkg, "127.0.0.2:0", tls);
    let url = format!(
        "https://127.0.0.2:{}/packages/a.ferry",
        other.local_addr().port()
    );
    let e = RemotePackage::open_with(&url, None, Some(&trust)).unwrap_err();
    assert!(
        matches!(e, ferry_transport::TransportError::TlsRefused { .. }),
        "{}",
        one_line(&e)
    );
}

#[test]
fn client_certificates_are_required_with_a_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = make_package(dir.path(), "a.ferry", 1);
    let f = tls_init(&dir.path().join("tls"), &[]).unwrap();
    let tls = ServerTls::from_files(&f.server_cert, &f.server_key, Some(&f.ca_cert)).unwrap();
    let reg = serve_tls(&pkg, "127.0.0.1:0", tls);
    let url = format!(
        "https://localhost:{}/packages/a.ferry",
        reg.local_addr().port()
    );
    let anonymous = ClientTls {
        ca: Some(f.ca_cert.clone()),
        ..ClientTls::default()
    };
    let e = RemotePackage::open_with(&url, None, Some(&anonymous)).unwrap_err();
    assert!(!one_line(&e).is_empty());
    let known = ClientTls {
        ca: Some(f.ca_cert.clone()),
        client_cert: Some(f.client_cert.clone()),
        client_key: Some(f.client_key.clone()),
    };
    let remote = RemotePackage::open_with(&url, None, Some(&known)).unwrap();
    assert_same_as_local(&remote, &Package::open(&pkg).unwrap());
    // A key that is not a key is named.
    let e = ServerTls::from_files(&f.server_cert, &f.ca_cert, None).unwrap_err();
    assert!(e.to_string().contains("ca.crt"), "{e}");
}

/// A server certificate that expired (signed by a CA the client trusts)
/// is refused with the TLS line.
#[test]
fn an_expired_certificate_is_refused() {
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let pkg = make_package(dir.path(), "a.ferry", 1);
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "old CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server.not_before = date_time_ymd(2020, 1, 1);
    server.not_after = date_time_ymd(2021, 1, 1);
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.crt"),
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
    );
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let tls = ServerTls::from_files(&cert_file, &key_file, None).unwrap();
    let reg = serve_tls(&pkg, "127.0.0.1:0", tls);
    let url = format!(
        "https://localhost:{}/packages/a.ferry",
        reg.local_addr().port()
    );
    let trust = ClientTls {
        ca: Some(ca_file),
        ..ClientTls::default()
    };
    let e = RemotePackage::open_with(&url, None, Some(&trust)).unwrap_err();
    assert!(
        matches!(e, ferry_transport::TransportError::TlsRefused { .. }),
        "{}",
        one_line(&e)
    );
    assert!(
        one_line(&e).contains("certificate expired"),
        "{}",
        one_line(&e)
    );
}
