//! A Redis client for the tests that move a Redis VM: a writer that keeps
//! writing `key:N = N` wherever the VM answers, and a check that every
//! acknowledged write is still there.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        use std::os::unix::io::AsRawFd;
        // SAFETY: setns on an open namespace file; only this thread moves.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "entering {path}");
        f()
    })
}

/// A Redis client speaking RESP over one connection.
pub struct Redis {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Redis {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Redis> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_nodelay(true)?;
        Ok(Redis {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    pub fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        let mut buf = format!("*{}\r\n", args.len());
        for a in args {
            buf.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(buf.as_bytes())
    }

    /// One reply line (bulk strings: their value; nil: None).
    pub fn reply(&mut self) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        let line = line.trim_end().to_string();
        match line.as_bytes().first() {
            Some(b'+') | Some(b':') => Ok(Some(line[1..].to_string())),
            Some(b'$') if line == "$-1" => Ok(None),
            Some(b'$') => {
                let mut v = String::new();
                self.r.read_line(&mut v)?;
                Ok(Some(v.trim_end().to_string()))
            }
            _ => Err(std::io::Error::other(format!("redis said {line}"))),
        }
    }
}

/// What the writer saw.
#[derive(Default)]
pub struct Writes {
    pub acked: Vec<u64>,
    /// When each of `acked` was acknowledged.
    pub acked_at: Vec<Instant>,
    pub longest_gap: Duration,
    pub reconnects: u32,
}

/// Writes `key:N = N` for N = 0, 1, ... to whichever host answers, one at a
/// time, reconnecting on any error, until `stop`.
pub fn writer(hosts: Vec<SocketAddr>, stop: Arc<AtomicBool>, out: Arc<Mutex<Writes>>) {
    let mut conn: Option<Redis> = None;
    let mut next = 0u64;
    let mut last_ack = Instant::now();
    let mut which = 0usize;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            let addr = hosts[which % hosts.len()];
            which += 1;
            match Redis::connect(addr) {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            }
            out.lock().unwrap().reconnects += 1;
        }
        let c = conn.as_mut().unwrap();
        let key = format!("key:{next}");
        let val = next.to_string();
        let ok = c.send(&["SET", &key, &val]).and_then(|_| c.reply());
        match ok {
            Ok(Some(r)) if r == "OK" => {
                let mut o = out.lock().unwrap();
                o.acked.push(next);
                o.acked_at.push(Instant::now());
                let gap = last_ack.elapsed();
                if gap > o.longest_gap {
                    o.longest_gap = gap;
                }
                last_ack = Instant::now();
                next += 1;
            }
            // Not acknowledged: the same key is written again, elsewhere.
            _ => conn = None,
        }
    }
}

/// Reads every acknowledged key back; returns the missing ones.
pub fn missing(addr: SocketAddr, acked: &[u64]) -> Vec<u64> {
    let mut c = Redis::connect(addr).unwrap();
    let mut lost = Vec::new();
    for chunk in acked.chunks(500) {
        for n in chunk {
            c.send(&["GET", &format!("key:{n}")]).unwrap();
        }
        for n in chunk {
            if c.reply().unwrap().as_deref() != Some(n.to_string().as_str()) {
                lost.push(*n);
            }
        }
    }
    lost
}
