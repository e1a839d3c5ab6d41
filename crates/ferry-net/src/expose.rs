//! `--expose [HOSTADDR:]HOSTPORT:GUESTPORT`: a userspace TCP proxy from a
//! host address into the VM namespace.
//!
//! A proxy rather than DNAT: DNAT of `127.0.0.1` needs `route_localnet` and
//! a MASQUERADE on the host, and a proxy can dial whichever namespace the VM
//! is in now, so exposure survives suspend, resume and moving the VM.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::NetError;

/// How long a proxy waits to reach the other side before giving up on a
/// client.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client of an exposure waits for its VM to be admitted
/// ([`Admission`]) before its connection is closed.
pub(crate) const ADMIT_WAIT: Duration = Duration::from_millis(250);

/// Whether an exposure's clients are carried to the guest yet. A VM that
/// arrives by a live move has its ports from the start of the copy, which
/// can last a minute, and its guest runs only at the switch. A client
/// that came before (one that gave up on a slow source and tried the
/// destination) was held for the dial's whole [`DIAL_TIMEOUT`] while the
/// guest could not answer, then closed: in the KVM lab a writer that
/// failed over so lost 9.4 s before it went back to the source, which
/// still served. Until admitted a client is closed after [`ADMIT_WAIT`],
/// so it goes back at once; the wait covers the moment of the switch,
/// when the source has cut its clients and the destination has not yet
/// admitted its own.
#[derive(Clone, Debug)]
pub(crate) struct Admission(Arc<(Mutex<bool>, Condvar)>);

impl Admission {
    pub(crate) fn new(open: bool) -> Admission {
        Admission(Arc::new((Mutex::new(open), Condvar::new())))
    }

    /// Clients are carried from now on; those waiting go on at once.
    pub(crate) fn admit(&self) {
        let (open, changed) = &*self.0;
        *open.lock().expect("admission") = true;
        changed.notify_all();
    }

    /// Whether clients are carried, waiting up to `limit` for it.
    pub(crate) fn wait(&self, limit: Duration) -> bool {
        let (open, changed) = &*self.0;
        let guard = open.lock().expect("admission");
        let (guard, _) = changed
            .wait_timeout_while(guard, limit, |open| !*open)
            .expect("admission");
        *guard
    }
}

/// One `--expose` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeSpec {
    /// Host address to listen on (default `127.0.0.1`).
    pub host: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl ExposeSpec {
    /// The host socket address.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.host_port)
    }
}

impl std::fmt::Display for ExposeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host_addr(), self.guest_port)
    }
}

impl FromStr for ExposeSpec {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = |why: &str| {
            NetError::BadOption(format!(
                "--expose '{s}': {why}; use [HOSTADDR:]HOSTPORT:GUESTPORT, e.g. 127.0.0.1:16379:6379"
            ))
        };
        let (host_part, ports) = match s.rsplitn(3, ':').collect::<Vec<_>>()[..] {
            [guest, host_port] => ("", (host_port, guest)),
            [guest, host_port, addr] => (addr, (host_port, guest)),
            _ => return Err(bad("expected two or three ':'-separated parts")),
        };
        let port = |p: &str, which: &str| -> Result<u16, NetError> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad(&format!("{which} '{p}' is not a port (1-65535)"))),
            }
        };
        let host = if host_part.is_empty() || host_part == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host_part
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| bad(&format!("'{host_part}' is not an IP address")))?
        };
        Ok(ExposeSpec {
            host,
            host_port: port(ports.0, "host port")?,
            guest_port: port(ports.1, "guest port")?,
        })
    }
}

/// Checks a list of exposures for clashes among themselves.
pub fn check_distinct(specs: &[ExposeSpec]) -> Result<(), NetError> {
    for (i, a) in specs.iter().enumerate() {
        if specs[..i].iter().any(|b| b.host_port == a.host_port) {
            return Err(NetError::BadOption(format!(
                "--expose: host port {} is given twice",
                a.host_port
            )));
        }
    }
    Ok(())
}

/// Binds a listener, turning "address in use" into a clear error.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, NetError> {
    TcpListener::bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => NetError::PortInUse { addr },
        std::io::ErrorKind::AddrNotAvailable => NetError::BadOption(format!(
            "--expose: {} is not an address of this host",
            addr.ip()
        )),
        std::io::ErrorKind::PermissionDenied => NetError::NotRoot {
            what: format!("listen on {addr}"),
            hint: String::new(),
        },
        _ => NetError::io(format!("listening on {addr}"))(e),
    })
}

/// Where a proxy sends an accepted client: it returns the stream to pipe
/// to, dialled from whichever namespace it must be.
pub(crate) type Dialer = Arc<dyn Fn(&TcpStream) -> std::io::Result<TcpStream> + Send + Sync>;

/// The most connections one proxy carries at once (each takes two copy
/// threads). A guest opening thousands of connections to its gateway gets
/// the excess closed at once, logged once per flood; the VM keeps running.
pub const MAX_PROXY_CONNECTIONS: usize = 256;

/// A running proxy: accept loop plus one pair of copy threads per client,
/// at most [`MAX_PROXY_CONNECTIONS`] clients at once. Dropping it closes
/// the listener and every client connection.
pub(crate) struct Proxy {
    listener: TcpListener,
    stopping: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts proxying `listener` through `dial`. `label` names it in logs.
    pub fn start(listener: TcpListener, label: String, dial: Dialer) -> Result<Proxy, NetError> {
        Proxy::start_capped(listener, label, dial, MAX_PROXY_CONNECTIONS)
    }

    /// As [`Proxy::start`], with at most `cap` clients at once.
    pub fn start_capped(
        listener: TcpListener,
        label: String,
        dial: Dialer,
        cap: usize,
    ) -> Result<Proxy, NetError> {
        let stopping = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>> = Arc::default();
        let accept_listener = listener
            .try_clone()
            .map_err(NetError::io("cloning a listener"))?;
        let (stop, table) = (stopping.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name(format!("proxy {label}"))
            .spawn(move || accept_loop(accept_listener, label, dial, stop, table, cap))
            .map_err(NetError::io("starting a proxy thread"))?;
        Ok(Proxy {
            listener,
            stopping,
            conns,
            accept: Some(accept),
        })
    }

    /// Closes every client connection it carries now, and goes on
    /// accepting new ones.
    pub fn drop_clients(&self) {
        for (_, (a, b)) in self.conns.lock().expect("conns").drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on our own listening socket wakes the blocked
        // accept (Linux returns EINVAL from it).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.drop_clients();
    }
}

fn accept_loop(
    listener: TcpListener,
    label: String,
    dial: Dialer,
    stopping: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
    cap: usize,
) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let active = Arc::new(AtomicUsize::new(0));
    let mut over_cap_logged = false;
    loop {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                tracing::warn!("proxy {label}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= cap {
            if !over_cap_logged {
                tracing::warn!(
                    "proxy {label}: {cap} connections at once; closing the excess until some end"
                );
                over_cap_logged = true;
            }
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        over_cap_logged = false;
        active.fetch_add(1, Ordering::SeqCst);
        let (dial, label, conns, stopping) =
            (dial.clone(), label.clone(), conns.clone(), stopping.clone());
        let slot = Slot(active.clone());
        let _ = std::thread::Builder::new()
            .name(format!("conn {label}"))
            .spawn(move || {
                let _slot = slot;
                let t = std::time::Instant::now();
                let upstream = match dial(&client) {
                    Ok(s) => {
                        tracing::debug!(
                            ms = t.elapsed().as_millis() as u64,
                            "proxy {label}: connected a client"
                        );
                        s
                    }
                    Err(e) => {
                        tracing::info!("proxy {label}: could not reach the other side: {e}");
                        return;
                    }
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let id = NEXT.fetch_add(1, Ordering::Relaxed);
                match (client.try_clone(), upstream.try_clone()) {
                    (Ok(a), Ok(b)) => {
                        if stopping.load(Ordering::SeqCst) {
                            return;
                        }
                        conns.lock().expect("conns").insert(id, (a, b));
                    }
                    _ => return,
                }
                pipe(client, upstream);
                conns.lock().expect("conns").remove(&id);
            });
    }
}

/// One connection's place under the cap, given back on drop (also when its
/// thread could not start: the closure, and with it the slot, is dropped).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies both ways until both directions are closed.
fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let back = std::thread::spawn(move || copy_half(b2, a2));
    copy_half(a, b);
    let _ = back.join();
}

fn copy_half(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Connects to `addr` from inside the namespace `ns` (the calling thread
/// is moved there: call it on a connection's own thread).
pub(crate) fn dial_in(ns: &File, addr: SocketAddr) -> std::io::Result<TcpStream> {
    // SAFETY: setns on a valid descriptor; only this thread moves.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    dial_quickly(addr, DIAL_TIMEOUT)
}

/// How often [`dial_quickly`] sends a fresh SYN while no attempt has
/// connected yet.
///
/// Not faster: a SYN sent to a guest that does not run yet is not lost
/// but waits in its tap (QEMU holds the tap from its start, paused or
/// receiving), so every re-sent SYN reaches the guest too, all at once
/// when it runs, and a just-resumed TCG guest answered the client later
/// for each: at 20 ms, a move's dial took 72-213 ms and the client's first
/// answer under bench/migrate's write load came 300-340 ms after the
/// destination ran in two moves of three (+154 ms over the raw engine's
/// gap, whose proxy tries every 100 ms); at 100 ms the dial took 46-82 ms,
/// the first answers 160-217 ms (+8 ms), and 12 alternating resumes
/// answered their first PING in 285 ms (median) against 318 ms at 20 ms.
const DIAL_STAGGER: Duration = Duration::from_millis(100);

/// How many attempts [`dial_quickly`] keeps open at once; beyond that the
/// oldest is given up (each has had `DIAL_STAGGER × DIAL_IN_FLIGHT`).
const DIAL_IN_FLIGHT: usize = 16;

/// Connects to `addr` within `limit`, sending a fresh SYN every
/// [`DIAL_STAGGER`] while the earlier attempts stay open: the first to
/// connect wins, the others are closed.
///
/// Why: a client that connects while the VM is resuming or switching hosts
/// makes the proxy dial a guest that is not running yet. Where that SYN is
/// lost (a guest whose NIC or service is not up yet), the kernel sends the
/// next one only after its initial RTO of 1 s: a resumed Redis once
/// answered its first PING over a second after the guest ran
/// (bench/resume). Attempts that overlap cost at most `DIAL_STAGGER`, and
/// a guest slow to answer (TCG, just resumed) still has its earlier SYNs
/// answered. A refused connection is not retried: the guest is running
/// and nothing listens there.
fn dial_quickly(addr: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let started = std::time::Instant::now();
    let deadline = started + limit;
    let mut attempts: std::collections::VecDeque<Socket> = std::collections::VecDeque::new();
    let mut next = started;
    loop {
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        if now >= next {
            if attempts.len() == DIAL_IN_FLIGHT {
                attempts.pop_front();
            }
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_nonblocking(true)?;
            match socket.connect(&addr.into()) {
                Ok(()) => return into_blocking(socket),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            attempts.push_back(socket);
            next = now + DIAL_STAGGER;
        }
        let wait = next.min(deadline).saturating_duration_since(now);
        let mut fds: Vec<libc::pollfd> = attempts
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries for
        // descriptors `attempts` keeps open during the call.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().max(1) as libc::c_int,
            )
        };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Which attempts finished: connected (the winner), refused (no
        // retry), or failed otherwise (dropped; later SYNs go on).
        let mut i = 0;
        let mut index = 0;
        while i < fds.len() {
            if fds[i].revents == 0 {
                i += 1;
                index += 1;
                continue;
            }
            let socket = attempts.remove(index).expect("one socket per pollfd");
            match socket.take_error()? {
                None => return into_blocking(socket),
                Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(e),
                Some(e) => tracing::debug!(%addr, "a dial attempt failed: {e}"),
            }
            i += 1;
        }
    }
}

/// A connected socket from [`dial_quickly`], back in blocking mode.
fn into_blocking(socket: socket2::Socket) -> std::io::Result<TcpStream> {
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

/// The destination a REDIRECTed connection was originally sent to.
pub(crate) fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: getsockopt fills a sockaddr_in we own, of the length we pass.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            &mut addr as *mut _ as *mut libc::c_void,
            &mut len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr))),
            u16::from_be(addr.sin_port),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_expose_forms() {
        let s: ExposeSpec = "16379:6379".parse().unwrap();
        assert_eq!(s.host_addr(), "127.0.0.1:16379".parse().unwrap());
        assert_eq!(s.guest_port, 6379);
        let s: ExposeSpec = "0.0.0.0:8080:80".parse().unwrap();
        assert_eq!(s.host_addr(), "0.0.0.0:8080".parse().unwrap());
        let s: ExposeSpec = "[::1]:8080:80".parse().unwrap();
        assert_eq!(s.host_addr(), "[::1]:8080".parse().unwrap());
        for bad in ["6379", "a:1:2", "1:0", "70000:1", "x.y:1:2", "1:2:3:4:5"] {
            let e = bad.parse::<ExposeSpec>().unwrap_err().to_string();
            assert!(e.contains("--expose"), "{bad}: {e}");
        }
    }

    /// A listener whose accept queue is full drops SYNs, as a guest whose
    /// service is not up yet does. Once it accepts again, a quick dial
    /// connects within about one stagger (100 ms); the kernel's own
    /// retransmission would take a second.
    #[test]
    fn a_dial_to_a_guest_that_drops_syns_connects_soon_after_it_answers() {
        use std::os::unix::io::FromRawFd;
        // SAFETY: a new socket; its descriptor is handed to the
        // TcpListener below, which owns and closes it.
        let listener = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
                0
            );
            assert_eq!(libc::listen(fd, 0), 0);
            TcpListener::from_raw_fd(fd)
        };
        let addr = listener.local_addr().unwrap();
        // Fill the accept queue until a connect goes unanswered.
        let mut held = Vec::new();
        while let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            held.push(s);
            assert!(held.len() < 64, "the accept queue never filled");
        }
        // Between two attempts (one every 100 ms).
        let opened = std::time::Instant::now() + Duration::from_millis(330);
        let acceptor = std::thread::spawn(move || {
            std::thread::sleep(opened.saturating_duration_since(std::time::Instant::now()));
            let mut accepted = Vec::new();
            listener.set_nonblocking(true).unwrap();
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < until {
                match listener.accept() {
                    Ok((s, _)) => accepted.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            accepted.len()
        });
        let dialled = dial_quickly(addr, Duration::from_secs(5)).expect("connects");
        let after_open = std::time::Instant::now().saturating_duration_since(opened);
        assert!(
            after_open < Duration::from_millis(160),
            "connected {after_open:?} after the listener accepted again"
        );
        drop((dialled, held));
        assert!(acceptor.join().unwrap() >= 1);
    }

    #[test]
    fn refuses_duplicate_host_ports() {
        let a: ExposeSpec = "1000:1".parse().unwrap();
        let b: ExposeSpec = "0.0.0.0:1000:2".parse().unwrap();
        assert!(check_distinct(&[a, b]).is_err());
    }

    #[test]
    fn port_in_use_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = bind(addr).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("{addr} is already in use: pick another host port for --expose (or stop what listens there)")
        );
    }

    /// A flood of connections: past the cap they are closed at once, and
    /// once some end, new ones are carried again. Checked to fail without
    /// the cap (the extra connections were then carried too).
    #[test]
    fn proxy_connections_are_capped() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let held_addr = held.local_addr().unwrap();
        // The far side answers "ok" and holds each connection open until
        // its client closes.
        std::thread::spawn(move || {
            for mut s in held.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = s.write_all(b"ok");
                    let _ = std::io::copy(&mut s, &mut std::io::sink());
                });
            }
        });
        let front = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let front_addr = front.local_addr().unwrap();
        let dial: Dialer = Arc::new(move |_| TcpStream::connect(held_addr));
        let _proxy = Proxy::start_capped(front, "cap".into(), dial, 4).unwrap();
        let answered = |c: &mut TcpStream| {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 2];
            matches!(c.read(&mut buf), Ok(2))
        };
        let mut carried: Vec<TcpStream> = (0..4)
            .map(|_| {
                let mut c = TcpStream::connect(front_addr).unwrap();
                assert!(answered(&mut c));
                c
            })
            .collect();
        for _ in 0..20 {
            let mut extra = TcpStream::connect(front_addr).unwrap();
            assert!(
                !answered(&mut extra),
                "a connection past the cap was carried"
            );
        }
        // One ends: its place is free again.
        drop(carried.pop());
        let t = std::time::Instant::now();
        loop {
            let mut c = TcpStream::connect(front_addr).unwrap();
            if answered(&mut c) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the freed place was not reused"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Before its VM is admitted an exposure closes a client after
    /// `ADMIT_WAIT`, without dialling; once admitted it carries clients,
    /// also one that was waiting when the admission came.
    #[test]
    fn an_exposure_closes_clients_until_its_vm_is_admitted() {
        let far = TcpListener::bind("127.0.0.1:0").unwrap();
        let far_addr = far.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in far.incoming().flatten() {
                let _ = s.write_all(b"ok");
            }
        });
        let admission = Admission::new(false);
        let dials = Arc::new(AtomicUsize::new(0));
        let (gate, counted) = (admission.clone(), dials.clone());
        let dial: Dialer = Arc::new(move |_| {
            if !gate.wait(ADMIT_WAIT) {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            }
            counted.fetch_add(1, Ordering::SeqCst);
            TcpStream::connect(far_addr)
        });
        let front = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let front_addr = front.local_addr().unwrap();
        let _proxy = Proxy::start(front, "gate".into(), dial).unwrap();
        let answer = |c: &mut TcpStream| {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 2];
            c.read(&mut buf).unwrap_or(0)
        };
        let t = std::time::Instant::now();
        let mut early = TcpStream::connect(front_addr).unwrap();
        assert_eq!(answer(&mut early), 0, "closed, not carried");
        let waited = t.elapsed();
        assert!(
            waited >= ADMIT_WAIT && waited < DIAL_TIMEOUT,
            "closed after {waited:?}"
        );
        assert_eq!(dials.load(Ordering::SeqCst), 0, "nothing was dialled");
        // A client waiting when the VM is admitted is carried.
        let mut waiting = TcpStream::connect(front_addr).unwrap();
        std::thread::sleep(ADMIT_WAIT / 5);
        admission.admit();
        assert_eq!(answer(&mut waiting), 2, "carried once admitted");
        let mut later = TcpStream::connect(front_addr).unwrap();
        assert_eq!(answer(&mut later), 2, "carried");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn proxy_pipes_both_ways_and_closes_on_drop() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        let front = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let front_addr = front.local_addr().unwrap();
        let dial: Dialer = Arc::new(move |_| TcpStream::connect(echo_addr));
        let proxy = Proxy::start(front, "test".into(), dial).unwrap();
        let mut c = TcpStream::connect(front_addr).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        drop(proxy);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = c.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the client connection is closed when the proxy stops");
        assert!(
            TcpStream::connect(front_addr).is_err(),
            "the listener is closed"
        );
    }
}
