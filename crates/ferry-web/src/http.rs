//! Just enough HTTP/1.1, both ways, on `std::net`.
//!
//! Why not a crate: the service answers a handful of routes with small
//! bodies, and its only client calls are to other `ferry-web`s. One
//! request per connection (`Connection: close`), bodies with a
//! `Content-Length`, no chunked encoding, no TLS: that fits in this file,
//! keeps the static binary small and its behaviour under bad input visible
//! here (every limit below is checked, nothing panics).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Largest request or response head (request line or status line plus
/// headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Largest request body accepted (a stored value is at most
/// [`crate::storage::MAX_VALUE`]; a broadcast carries one, JSON-escaped).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Largest response body a client call reads.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ... as sent.
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Why a request could not be read. Each maps to the status a client gets.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The connection closed or timed out before a whole request arrived;
    /// nobody to answer.
    #[error("the client went away: {0}")]
    Gone(std::io::Error),
    /// Not HTTP, or HTTP this server does not take.
    #[error("{0}")]
    Malformed(String),
    /// The head is longer than [`MAX_HEAD`].
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body is longer than [`MAX_BODY`].
    #[error("the request body ({0} bytes) is longer than {MAX_BODY} bytes")]
    BodyTooLarge(u64),
    /// A chunked (or otherwise encoded) body.
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length")]
    Encoded,
}

impl RequestError {
    /// The HTTP status for the error, `None` when there is nobody to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            RequestError::Gone(_) => None,
            RequestError::Malformed(_) => Some(400),
            RequestError::HeadTooLarge => Some(431),
            RequestError::BodyTooLarge(_) => Some(413),
            RequestError::Encoded => Some(501),
        }
    }
}

/// Reads the head: bytes up to and including the blank line, and whatever
/// of the body came with them.
fn read_head(stream: &mut impl Read, limit: usize) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > limit {
            return Ok(None);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The headers of a head, as (lower-case name, value), after its first line.
fn headers(head: &str) -> Result<Vec<(String, String)>, String> {
    head.split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|line| {
            line.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .ok_or_else(|| format!("bad header line '{}'", truncate(line, 80)))
        })
        .collect()
}

/// The `Content-Length`, if any; conflicting copies are an error.
fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, String> {
    let mut length = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        let n: u64 = value
            .parse()
            .map_err(|_| format!("bad Content-Length '{}'", truncate(value, 40)))?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length headers".to_owned());
        }
        length = Some(n);
    }
    Ok(length)
}

/// Reads one request. `stream` is also written to, for the
/// `100 Continue` that curl waits for before sending a larger body.
pub fn read_request<S: Read + Write>(stream: &mut S) -> Result<Request, RequestError> {
    let (head, mut body) = read_head(stream, MAX_HEAD)
        .map_err(RequestError::Gone)?
        .ok_or(RequestError::HeadTooLarge)?;
    let head = String::from_utf8(head)
        .map_err(|_| RequestError::Malformed("the request head is not UTF-8".to_owned()))?;
    let line = head.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && t.starts_with('/') => (m, t, v),
        _ => {
            return Err(RequestError::Malformed(format!(
                "bad request line '{}'",
                truncate(line, 80)
            )))
        }
    };
    if !version.starts_with("HTTP/1.") {
        return Err(RequestError::Malformed(format!(
            "unsupported protocol '{}'",
            truncate(version, 20)
        )));
    }
    let headers = headers(&head).map_err(RequestError::Malformed)?;
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(RequestError::Encoded);
    }
    let length = content_length(&headers).map_err(RequestError::Malformed)?;
    let length = length.unwrap_or(0);
    if length > MAX_BODY as u64 {
        return Err(RequestError::BodyTooLarge(length));
    }
    let length = length as usize;
    let expects_continue = headers
        .iter()
        .any(|(n, v)| n == "expect" && v.eq_ignore_ascii_case("100-continue"));
    if expects_continue && body.len() < length {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(RequestError::Gone)?;
    }
    if body.len() > length {
        // Pipelined bytes after the body: this server answers one request
        // per connection, so they are dropped with the connection.
        body.truncate(length);
    }
    let have = body.len();
    body.resize(length, 0);
    stream
        .read_exact(&mut body[have..])
        .map_err(RequestError::Gone)?;
    let path = target.split(['?', '#']).next().unwrap_or(target).to_owned();
    Ok(Request {
        method: method.to_owned(),
        path,
        body,
    })
}

/// A response to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_vec(value).expect("JSON values serialise");
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON error body: `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    /// Raw bytes.
    pub fn bytes(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            content_type: "application/octet-stream",
            headers: Vec::new(),
            body,
        }
    }

    /// Serialises status line, headers and body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// The reason phrase for the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A response a client call received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Its status code.
    pub status: u16,
    /// Its body.
    pub body: Vec<u8>,
}

/// Why a call to another member failed. The messages end up in JSON bodies,
/// so they say what happened in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection within the time limit.
    #[error("no connection to {addr} within {ms} ms")]
    ConnectTimeout {
        /// Where.
        addr: SocketAddr,
        /// The limit.
        ms: u128,
    },
    /// The connection was refused or failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Connected, but the whole answer did not come within the time limit.
    #[error("{addr} did not answer within {ms} ms")]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// The limit.
        ms: u128,
    },
    /// Connected, then the exchange failed.
    #[error("talking to {addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The answer is not HTTP this client reads.
    #[error("{addr} answered with something that is not HTTP: {message}")]
    BadAnswer {
        /// Where.
        addr: SocketAddr,
        /// What is wrong.
        message: String,
    },
}

/// Sends one request to `addr` and reads the answer, all within `timeout`
/// (connecting, writing and reading together).
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, CallError> {
    let deadline = Instant::now() + timeout;
    let ms = timeout.as_millis();
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
        if is_timeout(&source) {
            CallError::ConnectTimeout { addr, ms }
        } else {
            CallError::Connect { addr, source }
        }
    })?;
    let io = |source: std::io::Error| {
        if is_timeout(&source) {
            CallError::Timeout { addr, ms }
        } else {
            CallError::Io { addr, source }
        }
    };
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        // A zero timeout means "none" to the socket calls.
        (!left.is_zero())
            .then_some(left)
            .ok_or(CallError::Timeout { addr, ms })
    };
    stream.set_write_timeout(Some(left()?)).map_err(io)?;
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ferry-web\r\nConnection: close\r\n"
    );
    if method != "GET" || !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).map_err(io)?;

    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(left()?)).map_err(io)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
        if received.len() > MAX_HEAD + MAX_RESPONSE {
            return Err(CallError::BadAnswer {
                addr,
                message: format!("the answer is longer than {MAX_RESPONSE} bytes"),
            });
        }
        if let Ok(Some(answer)) = parse_answer(&received, false) {
            return Ok(answer);
        }
    }
    match parse_answer(&received, true) {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err(CallError::BadAnswer {
            addr,
            message: "the connection closed before the whole answer came".to_owned(),
        }),
        Err(message) => Err(CallError::BadAnswer { addr, message }),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// Parses a complete answer; `Ok(None)` while it may still be incomplete.
/// Without a `Content-Length` the body runs to the end of the connection,
/// so it is complete only `at_eof`.
fn parse_answer(bytes: &[u8], at_eof: bool) -> Result<Option<Answer>, String> {
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "a head that is not UTF-8")?;
    let line = head.split("\r\n").next().unwrap_or("");
    let status = match line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| format!("bad status line '{}'", truncate(line, 80)))?,
        _ => return Err(format!("bad status line '{}'", truncate(line, 80))),
    };
    let headers = headers(head)?;
    let body = &bytes[end + 4..];
    match content_length(&headers)? {
        Some(n) if (body.len() as u64) < n => Ok(None),
        Some(n) => Ok(Some(Answer {
            status,
            body: body[..n as usize].to_vec(),
        })),
        None if at_eof => Ok(Some(Answer {
            status,
            body: body.to_vec(),
        })),
        None => Ok(None),
    }
}

/// The first `max` characters of `text`, for error messages.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}...", text.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that reads from a buffer and records what is written.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn parse(bytes: &[u8]) -> (Result<Request, RequestError>, Vec<u8>) {
        let mut d = Duplex {
            input: Cursor::new(bytes.to_vec()),
            output: Vec::new(),
        };
        (read_request(&mut d), d.output)
    }

    #[test]
    fn reads_requests_with_and_without_bodies() {
        let (r, _) = parse(b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            r.unwrap(),
            Request {
                method: "GET".into(),
                path: "/health".into(),
                body: vec![],
            }
        );
        let (r, out) = parse(
            b"POST /storage/k HTTP/1.1\r\ncontent-length: 5\r\nExpect: 100-continue\r\n\r\nhello+extra",
        );
        let r = r.unwrap();
        assert_eq!(
            (r.method.as_str(), r.body.as_slice()),
            ("POST", &b"hello"[..])
        );
        // The body had already come: no 100 Continue needed.
        assert!(out.is_empty());
        let (r, out) =
            parse(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
        assert!(matches!(r, Err(RequestError::Gone(_))));
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn refuses_bad_requests_with_the_right_status() {
        let status = |bytes: &[u8]| parse(bytes).0.unwrap_err().status();
        assert_eq!(status(b"hello\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET / SPDY/3\r\n\r\n"), Some(400));
        assert_eq!(status(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"), Some(400));
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(501)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"),
            Some(413)
        );
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(status(&huge), Some(431));
        assert_eq!(status(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(status(b"\xff\xfe / HTTP/1.1\r\n\r\n"), Some(400));
    }

    #[test]
    fn writes_responses() {
        let r = Response::json(404, &serde_json::json!({"error": "no"}));
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Length: 15\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"error\":\"no\"}\n"), "{text}");
    }

    #[test]
    fn parses_answers() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Len", true),
            Ok(None)
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", true),
            Ok(None)
        );
        assert_eq!(
            parse_answer(
                b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nabcd",
                false
            ),
            Ok(Some(Answer {
                status: 201,
                body: b"ab".to_vec()
            }))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.0 500 Oops\r\n\r\nto the", false),
            Ok(None)
        );
        assert_eq!(
            parse_answer(b"HTTP/1.0 500 Oops\r\n\r\nto the end", true),
            Ok(Some(Answer {
                status: 500,
                body: b"to the end".to_vec()
            }))
        );
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n", true).is_err());
    }
}
