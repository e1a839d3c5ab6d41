//! Reading a package over HTTP with range requests: the header, the table,
//! then one chunk at a time, each checked exactly as a local
//! [`Package`](ferry_package::Package) checks it. The server is trusted for
//! nothing: whatever it sends either matches the package's own checksums or
//! is an error.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_package::{
    PackageError, PackageIndex, SectionInfo, SectionKind, TablePin, VmMeta, HEADER_SIZE,
};
use tracing::{debug, warn};
use ureq::http::{header, Response, Uri};
use ureq::Body;

use crate::server::Listing;
use crate::TransportError;

/// Attempts per request when the connection cannot be made (or the server
/// answers 502/503/504): a registry restarting or a connection dropped by an
/// idle timeout should not fail a run.
const ATTEMPTS: u32 = 4;
/// Wait before the second attempt; doubled after each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Largest registry listing read.
const MAX_LISTING: u64 = 16 << 20;

/// A package read over HTTP. Like a local package it can be shared between
/// threads; each [`read_chunk`](Self::read_chunk) is one range request.
pub struct RemotePackage {
    http: Http,
    index: PackageIndex,
}

/// The requests for one package URL.
struct Http {
    url: String,
    agent: ureq::Agent,
    /// `Bearer <token>`, when there is a token.
    auth: Option<String>,
    /// The `ETag` of the first answer, when the server sends one.
    etag: Option<String>,
    fetched: AtomicU64,
}

impl std::fmt::Debug for RemotePackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePackage")
            .field("url", &self.http.url)
            .field("token", &self.http.auth.is_some())
            .field("etag", &self.http.etag)
            .field("sections", &self.index.sections().len())
            .finish()
    }
}

impl RemotePackage {
    /// Opens a package over HTTP: fetches its header and section table with
    /// range requests and checks them as [`Package::open`] does.
    ///
    /// # Arguments
    /// - `url`: a registry root serving one package (`http://HOST:PORT/`,
    ///   any URL ending in `/` is read as a listing), a registry's
    ///   `http://HOST:PORT/packages/NAME`, or the URL of a package file on any
    ///   HTTP server that supports range requests. Any of them may end in
    ///   `#sha256=<table sha256>` (a pin): the package's table must then
    ///   have that digest, checked before anything but the header and
    ///   the table is fetched.
    /// - `token`: sent as `Authorization: Bearer <token>`; checked first
    ///   (at least [`MIN_TOKEN_LEN`](crate::MIN_TOKEN_LEN) characters).
    ///
    /// # Errors
    /// [`TransportError::BadToken`], [`TransportError::BadUrl`], [`TransportError::Connect`],
    /// [`TransportError::Unauthorized`], [`TransportError::NotFound`],
    /// [`TransportError::NotARegistry`], [`TransportError::EmptyRegistry`],
    /// [`TransportError::AmbiguousRegistry`],
    /// [`TransportError::RangeUnsupported`], [`TransportError::Package`] for a
    /// damaged or unsupported header or table or a pin that does not match
    /// ([`PackageError::PinMismatch`]), or another transfer error.
    ///
    /// [`Package::open`]: ferry_package::Package::open
    pub fn open(url: &str, token: Option<&str>) -> Result<RemotePackage, TransportError> {
        RemotePackage::open_with(url, token, None)
    }

    /// As [`RemotePackage::open`], with TLS settings for `https://` (a CA of
    /// one's own, a client certificate); `None`: the public roots.
    ///
    /// # Errors
    /// As [`RemotePackage::open`], and [`TransportError::Tls`] for a CA or
    /// client certificate that cannot be read.
    pub fn open_with(
        url: &str,
        token: Option<&str>,
        tls: Option<&crate::ClientTls>,
    ) -> Result<RemotePackage, TransportError> {
        // A short token is refused before any network I/O.
        let token = token.map(|t| crate::Token::new(t.trim())).transpose()?;
        let tls_config = tls.map(crate::ClientTls::ureq_config).transpose()?;
        let (url, pin) = split_pin(url)?;
        let uri = parse_url(url)?;
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                // Statuses are answers to handle, not transport errors.
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_recv_response(Some(Duration::from_secs(30)))
                // A stalled transfer fails instead of hanging a run.
                .timeout_per_read(Some(Duration::from_secs(30)))
                .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
                .tls_config(tls_config.unwrap_or_default())
                .build(),
        );
        let mut http = Http {
            url: url.to_string(),
            agent,
            auth: token.map(|t| format!("Bearer {}", t.expose())),
            etag: None,
            fetched: AtomicU64::new(0),
        };
        if uri.path().ends_with('/') {
            http.url = http.resolve_listing(&uri)?;
            debug!(url = %http.url, "the registry serves one package");
        }
        let index = http.read_index()?;
        if let Some(pin) = pin {
            pin.check(&index)?;
        }
        Ok(RemotePackage { http, index })
    }

    /// The package's URL (the registry's URL for it when opened from a
    /// registry root), without its `#sha256=` pin.
    pub fn url(&self) -> &str {
        &self.http.url
    }

    /// The checked header and table.
    pub fn index(&self) -> &PackageIndex {
        &self.index
    }

    /// What the package says about the VM inside it.
    ///
    /// # Errors
    /// [`TransportError::Package`] ([`PackageError::NotAVmPackage`], naming
    /// the URL) if its metadata is not a VM's that this version reads.
    pub fn vm_meta(&self) -> Result<VmMeta, TransportError> {
        Ok(VmMeta::from_json(self.index.metadata(), &self.http.url)?)
    }

    /// All sections, in the order they were written.
    pub fn sections(&self) -> &[SectionInfo] {
        self.index.sections()
    }

    /// The section of kind `kind`.
    ///
    /// # Errors
    /// [`TransportError::Package`] ([`PackageError::MissingSection`]) if
    /// the package has none.
    pub fn section(&self, kind: SectionKind) -> Result<&SectionInfo, TransportError> {
        Ok(self.index.section(kind)?)
    }

    /// Size of the package file on the server.
    pub fn file_size(&self) -> u64 {
        self.index.file_len()
    }

    /// Bytes of response bodies received so far (header, table, chunks).
    pub fn bytes_fetched(&self) -> u64 {
        self.http.fetched.load(Ordering::Relaxed)
    }

    /// Fetches chunk `index` of section `kind` with one range request and
    /// checks it against its sha256: its uncompressed bytes, or zeros for an
    /// all-zero chunk (nothing is fetched for those).
    ///
    /// # Errors
    /// [`TransportError::ChunkCorrupt`] if the bytes do not match;
    /// [`TransportError::Package`] for a missing section or an index past
    /// the end; a transfer error otherwise.
    pub fn read_chunk(&self, kind: SectionKind, index: usize) -> Result<Vec<u8>, TransportError> {
        let section = self.section(kind)?;
        let Some(Some(entry)) = section.chunks.get(index) else {
            return Ok(section.decode_chunk(index, &[])?);
        };
        let what = format!("chunk {index} of section {kind}");
        let stored = self
            .http
            .fetch(entry.offset, entry.stored_len, &what, self.file_size())?;
        section.decode_chunk(index, &stored).map_err(|e| match e {
            PackageError::ChunkCorrupt {
                section,
                index,
                offset,
            } => TransportError::ChunkCorrupt {
                url: self.http.url.clone(),
                section,
                index,
                offset,
            },
            other => other.into(),
        })
    }
}

impl Http {
    /// Reads the registry listing at `root` and returns the URL of its only
    /// package.
    fn resolve_listing(&self, root: &Uri) -> Result<String, TransportError> {
        let url = &self.url;
        let mut response = self.send(None, "the package listing")?;
        match response.status().as_u16() {
            200 => {}
            status => return Err(self.status_error(status, "the package listing")),
        }
        let not_registry = |detail: String| TransportError::NotARegistry {
            url: url.clone(),
            detail,
        };
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_LISTING)
            .read_to_vec()
            .map_err(|e| not_registry(format!("reading it failed: {}", describe(&e))))?;
        self.count(body.len() as u64);
        let listing: Listing = serde_json::from_slice(&body)
            .map_err(|e| not_registry(format!("not a JSON package list: {e}")))?;
        match listing.packages.as_slice() {
            [] => Err(TransportError::EmptyRegistry { url: url.clone() }),
            [one] => join_url(root, &one.url).ok_or_else(|| {
                not_registry(format!("the package URL {:?} is not usable", one.url))
            }),
            many => Err(TransportError::AmbiguousRegistry {
                url: url.clone(),
                names: many.iter().map(|p| p.name.clone()).collect(),
            }),
        }
    }

    /// Fetches the header (learning the file's length and ETag) and the
    /// table, and checks them.
    fn read_index(&mut self) -> Result<PackageIndex, TransportError> {
        let source = Path::new(&self.url);
        let what = "the package header";
        let response = self.send(Some((0, HEADER_SIZE - 1)), what)?;
        let status = response.status().as_u16();
        self.etag = header_str(&response, header::ETAG).map(str::to_string);
        let (head, file_len) = match status {
            206 => {
                let (first, last, total) = self.content_range(&response, what)?;
                // A file shorter than the header gets what it has.
                if first != 0 || last != (HEADER_SIZE - 1).min(total.saturating_sub(1)) {
                    return Err(self.bad_response(
                        what,
                        format!("asked for bytes 0-4095, got {first}-{last}/{total}"),
                    ));
                }
                (self.read_body(response, last + 1, what)?, total)
            }
            // An empty file.
            416 => match unsatisfied_length(&response) {
                Some(0) => (Vec::new(), 0),
                _ => return Err(self.status_error(status, what)),
            },
            _ => return Err(self.status_error(status, what)),
        };
        let table = PackageIndex::table_range(source, &head, file_len)?;
        let table_bytes = self.fetch(
            table.start,
            table.end - table.start,
            "the section table",
            file_len,
        )?;
        let index = PackageIndex::from_parts(source, &head, &table_bytes, file_len)?;
        // A signed package has its signature block just before the table
        // (one more small range); an unsigned one written by ferry has no
        // room for one, and costs no request.
        Ok(match index.signature_range() {
            Some(r) => {
                let block =
                    self.fetch(r.start, r.end - r.start, "the signature block", file_len)?;
                index.with_signature_block(&block)
            }
            None => index,
        })
    }

    /// Fetches `len` bytes at `start`, checking that the server's file has
    /// `file_len` bytes and the ETag seen at open.
    fn fetch(
        &self,
        start: u64,
        len: u64,
        what: &str,
        file_len: u64,
    ) -> Result<Vec<u8>, TransportError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = start + len - 1;
        let response = self.send(Some((start, last)), what)?;
        let status = response.status().as_u16();
        if status != 206 {
            return Err(self.status_error(status, what));
        }
        if let (Some(seen), Some(now)) = (&self.etag, header_str(&response, header::ETAG)) {
            if seen != now {
                return Err(TransportError::Changed {
                    url: self.url.clone(),
                    detail: format!("its ETag was {seen}, now {now}"),
                });
            }
        }
        let (first, got_last, total) = self.content_range(&response, what)?;
        if total != file_len {
            return Err(TransportError::Changed {
                url: self.url.clone(),
                detail: format!("it was {file_len} bytes, now {total}"),
            });
        }
        if (first, got_last) != (start, last) {
            return Err(self.bad_response(
                what,
                format!("asked for bytes {start}-{last}, got {first}-{got_last}"),
            ));
        }
        self.read_body(response, len, what)
    }

    /// Reads exactly `len` bytes of body.
    fn read_body(
        &self,
        mut response: Response<Body>,
        len: u64,
        what: &str,
    ) -> Result<Vec<u8>, TransportError> {
        if let Some(n) = response.body().content_length().filter(|&n| n != len) {
            return Err(self.bad_response(what, format!("Content-Length {n} for {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        let mut got = 0usize;
        let mut reader = response.body_mut().as_reader();
        let broke = |got: usize, detail: String| TransportError::Interrupted {
            url: self.url.clone(),
            what: what.to_string(),
            got: got as u64,
            expected: len,
            detail,
        };
        while got < buf.len() {
            match reader.read(&mut buf[got..]) {
                Ok(0) => {
                    self.count(got as u64);
                    return Err(broke(got, "the connection was closed".into()));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.count(got as u64);
                    return Err(broke(got, e.to_string()));
                }
            }
        }
        self.count(len);
        Ok(buf)
    }

    /// Sends a GET (for `range`, inclusive, when given), retrying connection
    /// failures and 502/503/504 with backoff. Any other answer is returned.
    fn send(
        &self,
        range: Option<(u64, u64)>,
        what: &str,
    ) -> Result<Response<Body>, TransportError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let mut request = self.agent.get(&self.url);
            if let Some((first, last)) = range {
                request = request.header(header::RANGE, format!("bytes={first}-{last}"));
            }
            if let Some(auth) = &self.auth {
                request = request.header(header::AUTHORIZATION, auth);
            }
            let retry_reason = match request.call() {
                Ok(r) if matches!(r.status().as_u16(), 502..=504) && attempt < ATTEMPTS => {
                    format!("the server answered {}", r.status())
                }
                Ok(r) => return Ok(r),
                Err(e) if transient(&e) && attempt < ATTEMPTS => describe(&e),
                Err(e) if transient(&e) => {
                    return Err(TransportError::Connect {
                        url: self.url.clone(),
                        attempts: attempt,
                        detail: describe(&e),
                    })
                }
                Err(e) if crate::is_tls_failure(&e) => {
                    return Err(TransportError::TlsRefused {
                        url: self.url.clone(),
                        detail: describe(&e),
                    })
                }
                Err(e) => {
                    return Err(TransportError::Request {
                        url: self.url.clone(),
                        what: what.to_string(),
                        detail: describe(&e),
                    })
                }
            };
            warn!(
                url = %self.url,
                "fetching {what} failed ({retry_reason}); retrying in {} ms",
                backoff.as_millis()
            );
            std::thread::sleep(backoff);
            backoff *= 2;
            attempt += 1;
        }
    }

    /// `Content-Range: bytes FIRST-LAST/TOTAL` of a 206.
    fn content_range(
        &self,
        response: &Response<Body>,
        what: &str,
    ) -> Result<(u64, u64, u64), TransportError> {
        let value = header_str(response, header::CONTENT_RANGE);
        value
            .and_then(crate::range::parse_content_range)
            .ok_or_else(|| self.bad_response(what, format!("Content-Range {value:?}")))
    }

    fn count(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
    }

    fn bad_response(&self, what: &str, detail: String) -> TransportError {
        TransportError::BadResponse {
            url: self.url.clone(),
            what: what.to_string(),
            detail,
        }
    }

    /// The error for an answer that is not the one expected.
    fn status_error(&self, status: u16, what: &str) -> TransportError {
        let url = self.url.clone();
        match status {
            200 => TransportError::RangeUnsupported {
                url,
                status,
                what: what.to_string(),
            },
            401 => TransportError::Unauthorized {
                url,
                token_sent: self.auth.is_some(),
            },
            404 => TransportError::NotFound { url },
            status => TransportError::Status {
                url,
                status,
                what: what.to_string(),
            },
        }
    }
}

/// Errors worth another attempt: no connection, or one that was dropped
/// before any answer.
fn transient(e: &ureq::Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect),
        ureq::Error::Io(io) => matches!(
            io.kind(),
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::NotConnected
                | K::BrokenPipe
                | K::UnexpectedEof
                | K::TimedOut
        ),
        _ => false,
    }
}

/// An error of the HTTP client in words (without its "io: " prefixes).
/// Whether `e` is rustls refusing the handshake (directly, or inside an
/// I/O error).
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::Timeout(t) => format!("timed out: {t}"),
        other => other.to_string(),
    }
}

/// `url` without its `#sha256=<digest>` pin, and the pin. Any other
/// fragment is refused: a typo must not drop the pin silently.
fn split_pin(url: &str) -> Result<(&str, Option<TablePin>), TransportError> {
    let Some((base, fragment)) = url.split_once('#') else {
        return Ok((url, None));
    };
    let bad = |detail: String| TransportError::BadUrl {
        url: url.to_string(),
        detail,
    };
    let digest = fragment.strip_prefix("sha256=").ok_or_else(|| {
        bad(format!(
            "its fragment `#{fragment}` is not a pin: the only fragment ferry reads is `#sha256=<table sha256>`"
        ))
    })?;
    let pin = TablePin::parse(digest).map_err(|e| bad(format!("the pin {e}")))?;
    Ok((base, Some(pin)))
}

/// Checks that `url` is one this client can fetch from.
fn parse_url(url: &str) -> Result<Uri, TransportError> {
    let bad = |detail: &str| TransportError::BadUrl {
        url: url.to_string(),
        detail: detail.to_string(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("it does not parse"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("only http:// and https:// URLs are supported")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    Ok(uri)
}

/// `reference` (from a listing) relative to `base`: absolute URLs as they
/// are, absolute paths on `base`'s origin, relative paths below `base`.
fn join_url(base: &Uri, reference: &str) -> Option<String> {
    if reference.starts_with("http://") || reference.starts_with("https://") {
        return Some(reference.to_string());
    }
    let origin = format!("{}://{}", base.scheme_str()?, base.authority()?);
    if reference.starts_with('/') {
        return Some(format!("{origin}{reference}"));
    }
    let dir = base.path();
    let dir = &dir[..dir.rfind('/')? + 1];
    Some(format!("{origin}{dir}{reference}"))
}

fn header_str(response: &Response<Body>, name: header::HeaderName) -> Option<&str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The length in `Content-Range: bytes */LEN` of a 416.
fn unsatisfied_length(response: &Response<Body>) -> Option<u64> {
    header_str(response, header::CONTENT_RANGE).and_then(crate::range::parse_unsatisfied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let base: Uri = "http://h:1/reg/".parse().unwrap();
        assert_eq!(
            join_url(&base, "/packages/a").as_deref(),
            Some("http://h:1/packages/a")
        );
        assert_eq!(
            join_url(&base, "packages/a").as_deref(),
            Some("http://h:1/reg/packages/a")
        );
        assert_eq!(join_url(&base, "http://x/p").as_deref(), Some("http://x/p"));
        assert!(parse_url("http://127.0.0.1:1/").is_ok());
        assert!(parse_url("ftp://h/p").is_err());
        assert!(parse_url("/just/a/path").is_err());
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn pins() {
        let d = "ab".repeat(32);
        let full = format!("http://h:1/packages/a#sha256={d}");
        let (url, pin) = split_pin(&full).unwrap();
        assert_eq!(url, "http://h:1/packages/a");
        assert_eq!(pin.unwrap().to_hex(), d);
        assert!(split_pin("http://h:1/p").unwrap().1.is_none());
        for bad in ["http://h/p#sha256=12", "http://h/p#md5=ab", "http://h/p#"] {
            let e = split_pin(bad).unwrap_err();
            assert!(matches!(e, TransportError::BadUrl { .. }), "{bad}: {e}");
        }
    }
}
