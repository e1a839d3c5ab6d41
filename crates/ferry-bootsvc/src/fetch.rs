//! The node side of the service, for `ferry boot --from-bss`: ask for a
//! MAC's boot data (`bootscript?mac=…&json=1`), then download its kernel
//! and initrd, checking a `#sha256=HEX` digest where the URL carries one.
//!
//! A service that is down is retried with doubling delays (a node powered
//! on before its boot service waits for it); an answer that says no (404
//! for an unknown MAC, a kernel URL that 404s, a digest that differs) is
//! final at once, so the VM is never started on bad input.
//!
//! A root image named in the params as dracut's `root=live:URL` (what
//! OpenCHAMI's nodes boot from) is downloaded too, the same way: ferry's
//! guest takes its root file system from its disk, so that is its disk.
//! A root image named as `ferry.root=URL` is the guest's to download (its
//! initramfs fetches it into RAM); here it is only checked to be there.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::ids;
use crate::types::{BootData, Problem};

/// What to fetch, and where to.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The service's base URL (`http://host:port` or `https://`).
    pub url: String,
    /// The node's MAC.
    pub mac: String,
    /// The directory the kernel and initrd are written to.
    pub dest: PathBuf,
    /// Tries of each request while the service is unreachable (at least 1).
    pub attempts: u32,
    /// The delay after the first failed try; doubled after each.
    pub first_delay: Duration,
    /// `(host, instead)`: boot URLs whose host is `host` are fetched at
    /// `instead` (same port and path). A netbooted guest's boot data names
    /// URLs as the guest reaches them (its gateway, e.g. `172.100.100.1`),
    /// and the gateway leads there to this host's loopback, which is where
    /// ferry checks them first. `None`: every URL as it is.
    pub host_alias: Option<(String, String)>,
}

/// The boot data fetched and its files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedBoot {
    /// The kernel command line (BSS's `kernel ` prefix removed).
    pub params: String,
    /// The kernel file.
    pub kernel: PathBuf,
    /// The initrd file, if the boot data has one.
    pub initrd: Option<PathBuf>,
    /// The root image the params name as `root=live:URL`, if they do.
    pub root: Option<PathBuf>,
    /// The kernel's URL, as the service gave it.
    pub kernel_url: String,
}

/// Why the boot data or files could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchBootError {
    /// The MAC is malformed.
    #[error("--mac: {0}")]
    BadMac(#[from] ids::IdError),
    /// The service did not answer after every try.
    #[error("the boot service at {url} did not answer after {attempts} tries: {detail}")]
    ServiceDown {
        /// What was asked.
        url: String,
        /// Tries made.
        attempts: u32,
        /// The last failure.
        detail: String,
    },
    /// The service has no boot data for the MAC.
    #[error("the boot service has no boot data for {mac}: {detail}")]
    NoBootData {
        /// The MAC.
        mac: String,
        /// The service's reason.
        detail: String,
    },
    /// A download answered an error status.
    #[error("{url} answered HTTP {status}: {detail}")]
    Http {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The body or problem detail.
        detail: String,
    },
    /// The boot data is unusable.
    #[error("the boot data for {mac} is unusable: {detail}")]
    BadBootData {
        /// The MAC.
        mac: String,
        /// Why.
        detail: String,
    },
    /// A file's digest differs from the one its URL names.
    #[error("{url}: sha256 is {actual}, the URL says {expected}")]
    DigestMismatch {
        /// The URL.
        url: String,
        /// The digest in the URL.
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// The TLS handshake with the service (or a download's server) failed:
    /// final at once, as retrying cannot help.
    #[error("TLS with {url} failed: {detail}: give --ca FILE, the CA that signed its --tls-cert")]
    Tls {
        /// What was asked.
        url: String,
        /// rustls's reason.
        detail: String,
    },
    /// `--ca` or a client certificate could not be read.
    #[error(transparent)]
    TlsFiles(#[from] ferry_transport::TlsError),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A URL without its fragment, and the `sha256=` digest the fragment names.
///
/// # Errors
/// [`FetchBootError::BadBootData`] for a fragment naming a malformed digest.
pub fn split_digest(url: &str, mac: &str) -> Result<(String, Option<String>), FetchBootError> {
    let Some((base, fragment)) = url.split_once('#') else {
        return Ok((url.to_string(), None));
    };
    let Some(hex) = fragment.strip_prefix("sha256=") else {
        return Ok((base.to_string(), None));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchBootError::BadBootData {
            mac: mac.to_string(),
            detail: format!("{url}: the #sha256= digest is not 64 hex digits"),
        });
    }
    Ok((base.to_string(), Some(hex.to_ascii_lowercase())))
}

/// The URL of `root=live:URL` in kernel params (dracut's live root, as
/// OpenCHAMI's boot parameters name a node's image), if there is one.
pub fn root_live_url(params: &str) -> Option<&str> {
    params
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("root=live:"))
        .find(|u| u.starts_with("http://") || u.starts_with("https://"))
}

/// The URL of `ferry.root=URL` in kernel params: a root image the guest's
/// initramfs downloads into RAM itself (a ferry blueprint's `disk.ext4`),
/// for a stateless node that keeps nothing on a disk.
pub fn ferry_root_url(params: &str) -> Option<&str> {
    params
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("ferry.root="))
        .find(|u| u.starts_with("http://"))
}

/// One GET, retried while the service is unreachable or answers 5xx.
/// `on_retry(try, delay, why)` hears of each retry.
fn get_retrying(
    agent: &ureq::Agent,
    url: &str,
    opts: &FetchOptions,
    on_retry: &mut dyn FnMut(u32, Duration, &str),
) -> Result<ureq::http::Response<ureq::Body>, FetchBootError> {
    let attempts = opts.attempts.max(1);
    let mut delay = opts.first_delay;
    let mut last = String::new();
    for attempt in 1..=attempts {
        match agent.get(url).call() {
            Err(e) if ferry_transport::is_tls_failure(&e) => {
                return Err(FetchBootError::Tls {
                    url: url.to_string(),
                    detail: e.to_string(),
                })
            }
            Ok(r) if r.status().as_u16() < 500 => return Ok(r),
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            Err(e) => last = e.to_string(),
        }
        if attempt < attempts {
            on_retry(attempt, delay, &last);
            std::thread::sleep(delay);
            delay = delay.saturating_mul(2).min(Duration::from_secs(30));
        }
    }
    Err(FetchBootError::ServiceDown {
        url: url.to_string(),
        attempts,
        detail: last,
    })
}

/// One HEAD, retried as [`get_retrying`] retries; the status.
fn head_retrying(
    agent: &ureq::Agent,
    url: &str,
    opts: &FetchOptions,
    on_retry: &mut dyn FnMut(u32, Duration, &str),
) -> Result<u16, FetchBootError> {
    let attempts = opts.attempts.max(1);
    let mut delay = opts.first_delay;
    let mut last = String::new();
    for attempt in 1..=attempts {
        match agent.head(url).call() {
            Err(e) if ferry_transport::is_tls_failure(&e) => {
                return Err(FetchBootError::Tls {
                    url: url.to_string(),
                    detail: e.to_string(),
                })
            }
            Ok(r) if r.status().as_u16() < 500 => return Ok(r.status().as_u16()),
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            Err(e) => last = e.to_string(),
        }
        if attempt < attempts {
            on_retry(attempt, delay, &last);
            std::thread::sleep(delay);
            delay = delay.saturating_mul(2).min(Duration::from_secs(30));
        }
    }
    Err(FetchBootError::ServiceDown {
        url: url.to_string(),
        attempts,
        detail: last,
    })
}

fn detail_of(body: &str) -> String {
    serde_json::from_str::<Problem>(body)
        .map(|p| p.detail)
        .unwrap_or_else(|_| body.trim().chars().take(200).collect())
}

/// `url` with its host replaced as [`FetchOptions::host_alias`] says.
pub fn aliased(url: &str, alias: Option<&(String, String)>) -> String {
    let Some((host, instead)) = alias else {
        return url.to_string();
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (h, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    };
    if !h.eq_ignore_ascii_case(host) {
        return url.to_string();
    }
    match port {
        Some(p) => format!("{scheme}://{instead}:{p}{tail}"),
        None => format!("{scheme}://{instead}{tail}"),
    }
}

/// Downloads `url` to `dest`, checking its digest; the file appears under
/// its name only once complete and checked.
fn download(
    agent: &ureq::Agent,
    url: &str,
    mac: &str,
    dest: &Path,
    opts: &FetchOptions,
    on_retry: &mut dyn FnMut(u32, Duration, &str),
) -> Result<(), FetchBootError> {
    let (plain, digest) = split_digest(&aliased(url, opts.host_alias.as_ref()), mac)?;
    let mut r = get_retrying(agent, &plain, opts, on_retry)?;
    let status = r.status().as_u16();
    if status != 200 {
        let body = r.body_mut().read_to_string().unwrap_or_default();
        return Err(FetchBootError::Http {
            url: plain,
            status,
            detail: detail_of(&body),
        });
    }
    let io = |source| FetchBootError::Io {
        path: dest.to_path_buf(),
        source,
    };
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp).map_err(io)?;
    let mut reader = r.body_mut().with_config().limit(u64::MAX).reader();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = reader.read(&mut buf).map_err(|e| FetchBootError::Http {
            url: plain.clone(),
            status,
            detail: format!("the download broke off: {e}"),
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io)?;
    }
    out.sync_all().map_err(io)?;
    let actual = hex::encode(hasher.finalize());
    if let Some(expected) = digest {
        if expected != actual {
            let _ = std::fs::remove_file(&tmp);
            return Err(FetchBootError::DigestMismatch {
                url: url.to_string(),
                expected,
                actual,
            });
        }
    }
    std::fs::rename(&tmp, dest).map_err(io)
}

/// Fetches the boot data for `opts.mac` and its kernel and initrd into
/// `opts.dest` (as `kernel` and `initrd`).
///
/// # Errors
/// [`FetchBootError`]: a bad MAC, the service down after every try, no
/// boot data (404), a download that fails or whose digest differs.
pub fn fetch_boot(
    opts: &FetchOptions,
    on_retry: impl FnMut(u32, Duration, &str),
) -> Result<FetchedBoot, FetchBootError> {
    fetch_boot_tls(opts, None, on_retry)
}

/// As [`fetch_boot`], with `tls` (`--ca`, a client certificate) for an
/// `https://` service and downloads; without it `https://` trusts the
/// public roots.
///
/// # Errors
/// As [`fetch_boot`]; [`FetchBootError::Tls`] (final, not retried) when a
/// handshake fails, [`FetchBootError::TlsFiles`] when `tls`'s files cannot
/// be read.
pub fn fetch_boot_tls(
    opts: &FetchOptions,
    tls: Option<&ferry_transport::ClientTls>,
    mut on_retry: impl FnMut(u32, Duration, &str),
) -> Result<FetchedBoot, FetchBootError> {
    let mac = ids::parse_mac(&opts.mac)?;
    let tls = tls.cloned().unwrap_or_default().ureq_config()?;
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(600)))
            .build(),
    );
    let base = opts.url.trim_end_matches('/');
    let url = format!("{base}/boot/v1/bootscript?mac={mac}&json=1");
    let mut r = get_retrying(&agent, &url, opts, &mut on_retry)?;
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    if status == 404 {
        return Err(FetchBootError::NoBootData {
            mac,
            detail: detail_of(&body),
        });
    }
    if status != 200 {
        return Err(FetchBootError::Http {
            url,
            status,
            detail: detail_of(&body),
        });
    }
    let data: BootData = serde_json::from_str(&body).map_err(|e| FetchBootError::BadBootData {
        mac: mac.clone(),
        detail: e.to_string(),
    })?;
    if data.kernel.path.is_empty() {
        return Err(FetchBootError::BadBootData {
            mac,
            detail: "it names no kernel".into(),
        });
    }
    let params = data
        .params
        .strip_prefix("kernel ")
        .unwrap_or(&data.params)
        .to_string();
    std::fs::create_dir_all(&opts.dest).map_err(|source| FetchBootError::Io {
        path: opts.dest.clone(),
        source,
    })?;
    let kernel = opts.dest.join("kernel");
    download(
        &agent,
        &data.kernel.path,
        &mac,
        &kernel,
        opts,
        &mut on_retry,
    )?;
    let initrd = if data.initrd.path.is_empty() {
        None
    } else {
        let path = opts.dest.join("initrd");
        download(&agent, &data.initrd.path, &mac, &path, opts, &mut on_retry)?;
        Some(path)
    };
    let root = match root_live_url(&params) {
        None => None,
        Some(url) => {
            let path = opts.dest.join("rootfs");
            download(&agent, url, &mac, &path, opts, &mut on_retry)?;
            Some(path)
        }
    };
    // The guest fetches a `ferry.root=` image itself; that it is there is
    // checked now, so that a URL that 404s starts no VM.
    if let Some(url) = ferry_root_url(&params) {
        let (plain, _) = split_digest(&aliased(url, opts.host_alias.as_ref()), &mac)?;
        let status = head_retrying(&agent, &plain, opts, &mut on_retry)?;
        if status != 200 {
            return Err(FetchBootError::Http {
                url: plain,
                status,
                detail: "the root image (ferry.root=) is not there".into(),
            });
        }
    }
    Ok(FetchedBoot {
        params,
        kernel,
        initrd,
        root,
        kernel_url: data.kernel.path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_come_from_the_fragment() {
        let h = "a".repeat(64);
        assert_eq!(
            split_digest(&format!("http://h/k#sha256={h}"), "m").unwrap(),
            ("http://h/k".to_string(), Some(h))
        );
        assert_eq!(
            split_digest("http://h/k", "m").unwrap(),
            ("http://h/k".to_string(), None)
        );
        assert!(split_digest("http://h/k#sha256=abc", "m").is_err());
    }

    #[test]
    fn an_alias_replaces_only_its_host() {
        let a = ("172.100.100.1".to_string(), "127.0.0.1".to_string());
        assert_eq!(
            aliased("http://172.100.100.1:8080/files/k#sha256=ab", Some(&a)),
            "http://127.0.0.1:8080/files/k#sha256=ab"
        );
        assert_eq!(
            aliased("http://172.100.100.1/k", Some(&a)),
            "http://127.0.0.1/k"
        );
        assert_eq!(
            aliased("http://172.100.100.10:80/k", Some(&a)),
            "http://172.100.100.10:80/k"
        );
        assert_eq!(
            aliased("http://172.100.100.1/k", None),
            "http://172.100.100.1/k"
        );
    }

    #[test]
    fn the_root_image_is_root_live() {
        assert_eq!(
            root_live_url("console=ttyS0 root=live:http://h/r.img#sha256=ab quiet"),
            Some("http://h/r.img#sha256=ab")
        );
        assert_eq!(root_live_url("root=/dev/vda root=live:nfs://x"), None);
        assert_eq!(root_live_url("console=ttyS0"), None);
        assert_eq!(
            ferry_root_url("quiet ferry.root=http://h/d.ext4#sha256=ab ds=x"),
            Some("http://h/d.ext4#sha256=ab")
        );
        assert_eq!(ferry_root_url("ferry.root=https://h/d.ext4"), None);
        assert_eq!(ferry_root_url("root=live:http://h/r.img"), None);
    }
}
