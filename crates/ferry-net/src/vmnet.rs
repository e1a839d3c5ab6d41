//! One VM's network: its namespace (used or created), the tap the engine
//! attaches to, the gateway forwarder that lets the guest reach any exposed
//! service at `172.100.100.1:HOSTPORT`, and its own exposures. Dropping a
//! [`VmNetwork`] removes exactly what it created, in reverse order.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use crate::expose::{self, Dialer, ExposeSpec, Proxy};
use crate::iptables::{Batch, Chain};
use crate::ns::Netns;
use crate::plumbing::{self, FileLock};
use crate::{nl, tap, GuestNet, NetError, TAP_MAC, TAP_NAME};

/// Where per-namespace "in use" locks live (host-wide, like the names).
const NS_LOCK_DIR: &str = "/run/ferry/netns";

/// Finds the host address behind an exposed host port, for guests that
/// dial `172.100.100.1:PORT`; `None` for a port no VM exposes (the guest's
/// connection is then closed: never a fallback to the host's loopback).
pub type PortResolver = Arc<dyn Fn(u16) -> Option<SocketAddr> + Send + Sync>;

/// How to attach a VM.
pub struct VmNetOptions {
    /// The VM's name.
    pub vm_name: String,
    /// `--netns`: use (or create) this namespace; `None`: a private one.
    pub netns: Option<String>,
    /// Private namespaces are named `<prefix>-<vm name>`.
    pub private_prefix: String,
    /// `--expose` values.
    pub exposes: Vec<ExposeSpec>,
    /// Where a guest's `172.100.100.1:PORT` goes; `None`: nowhere (every
    /// such connection is closed).
    pub resolve: Option<PortResolver>,
    /// The guest's addressing (from the blueprint).
    pub guest: GuestNet,
    /// The guest may also send DHCP (UDP to port 67) into its namespace,
    /// where the caller runs a DHCP server on the tap (a netbooting guest:
    /// its firmware asks DHCP for its address and boot URL).
    pub dhcp: bool,
    /// The exposures carry clients from the start. A VM that arrives by a
    /// live move is not admitted until its switch
    /// ([`VmNetwork::admit_clients`]): before, a client is closed after a
    /// quarter of a second, undialled (see `expose::Admission`).
    pub admitted: bool,
}

/// A VM's network, live until dropped.
pub struct VmNetwork {
    ns: Arc<Netns>,
    /// Whether ferry made the namespace (and removes it with the VM).
    created: bool,
    made_tap: bool,
    gateway_chain: Option<Chain>,
    /// The guest's filter chains (see [`isolate`]).
    guard_chains: Vec<Chain>,
    proxies: Vec<Proxy>,
    exposes: Vec<ExposeSpec>,
    /// Whether the exposures carry clients yet.
    admission: expose::Admission,
    _lock: FileLock,
}

impl std::fmt::Debug for VmNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmNetwork")
            .field("netns", &self.ns.name())
            .field("created", &self.created)
            .field("exposes", &self.exposes)
            .finish()
    }
}

impl VmNetwork {
    /// Sets up the VM's network before its engine starts. Host ports are
    /// bound first, so a port in use fails before anything is created.
    pub fn attach(opts: VmNetOptions) -> Result<VmNetwork, NetError> {
        Self::prepare(opts)?.finish()
    }

    /// The part of [`VmNetwork::attach`] the engine needs to start: the
    /// host ports bound, the namespace and the tap made. The rest (links,
    /// addresses, routes, firewall, proxies) is [`PendingNetwork::finish`],
    /// which may run while the engine loads, as long as it is done before
    /// the guest runs: until then nothing can use the tap.
    pub fn prepare(opts: VmNetOptions) -> Result<PendingNetwork, NetError> {
        if !crate::is_root() {
            return Err(NetError::NotRoot {
                what: "give the VM a network (namespace, tap, NAT)".into(),
                hint: "; or pass --net none for a VM without a network".into(),
            });
        }
        expose::check_distinct(&opts.exposes)?;
        let listeners = opts
            .exposes
            .iter()
            .map(|e| expose::bind(e.host_addr()))
            .collect::<Result<Vec<_>, _>>()?;
        let name = match &opts.netns {
            Some(n) => n.clone(),
            None => format!("{}-{}", opts.private_prefix, opts.vm_name),
        };
        crate::ns::validate_name(&name)?;
        let holder = format!("VM '{}' (pid {})", opts.vm_name, std::process::id());
        let lock = match plumbing::try_lock(
            &PathBuf::from(NS_LOCK_DIR).join(format!("{name}.lock")),
            &holder,
        )? {
            Ok(lock) => lock,
            Err(held_by) => {
                return Err(NetError::NamespaceInUse {
                    name,
                    holder: if held_by.is_empty() {
                        "another VM".into()
                    } else {
                        held_by
                    },
                })
            }
        };
        let (ns, created) = match Netns::open(&name)? {
            Some(ns) if opts.netns.is_some() => (ns, false),
            existing => {
                // A private namespace that exists while its lock is free is
                // a crashed run's leftover: start clean.
                if existing.is_some() {
                    tracing::info!("removing the stale namespace {name}");
                    drop(existing);
                    plumbing::unprovision(&name)?;
                }
                (Netns::create(&name)?, true)
            }
        };
        let mut net = VmNetwork {
            ns: Arc::new(ns),
            created,
            made_tap: false,
            gateway_chain: None,
            guard_chains: Vec::new(),
            proxies: Vec::new(),
            exposes: opts.exposes.clone(),
            admission: expose::Admission::new(opts.admitted),
            _lock: lock,
        };
        // An existing namespace: a crashed VM's tap may still be there.
        if !net.created && nl::link_exists(Some(&net.ns), TAP_NAME)? {
            nl::delete_link(Some(&net.ns), TAP_NAME)?;
        }
        let tap_fd = Arc::new(tap::create(&net.ns, TAP_NAME)?);
        net.made_tap = true;
        Ok(PendingNetwork {
            net,
            listeners,
            opts,
            tap_fd,
        })
    }

    /// The namespace's name.
    pub fn netns_name(&self) -> &str {
        self.ns.name()
    }

    /// Its path, for the engine to enter.
    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }

    /// The tap the engine attaches the guest to.
    pub fn tap(&self) -> &str {
        TAP_NAME
    }

    /// The exposures in effect.
    pub fn exposes(&self) -> &[ExposeSpec] {
        &self.exposes
    }

    /// Stops the `--expose` proxies now and closes their clients'
    /// connections (the gateway forwarder stays).
    pub fn close_exposures(&mut self) {
        // The gateway forwarder is the first proxy; the exposures follow.
        self.proxies.truncate(1);
    }

    /// The exposures carry clients from now on (a VM that arrived by a
    /// live move, at its switch: see [`VmNetOptions::admitted`]).
    pub fn admit_clients(&self) {
        self.admission.admit();
    }

    /// Closes the connections the `--expose` proxies carry now; they go
    /// on accepting new ones. For a VM about to run elsewhere: its clients
    /// reconnect there while it is still switching.
    pub fn drop_exposed_clients(&self) {
        for proxy in self.proxies.iter().skip(1) {
            proxy.drop_clients();
        }
    }

    /// Takes the guest's interface down on the host's side, unseen by the
    /// guest: what it sends from now on is dropped and nothing reaches it.
    /// For a VM that must run a moment without being heard (saving a VM
    /// left in doubt by a move, whose other copy may be running).
    pub fn silence_guest(&self) -> Result<(), NetError> {
        nl::link_down(Some(&self.ns), TAP_NAME)
    }

    /// Whether ferry created the namespace for this VM.
    pub fn created_namespace(&self) -> bool {
        self.created
    }

    fn teardown(&mut self) -> Result<(), NetError> {
        self.proxies.clear();
        if std::mem::take(&mut self.created) {
            let name = self.ns.name().to_string();
            // Everything inside goes with the namespace.
            return plumbing::unprovision(&name);
        }
        if let Some(chain) = self.gateway_chain.take() {
            chain.remove(Some(&self.ns))?;
        }
        for chain in std::mem::take(&mut self.guard_chains) {
            chain.remove(Some(&self.ns))?;
        }
        if std::mem::take(&mut self.made_tap) {
            nl::delete_link(Some(&self.ns), TAP_NAME)?;
        }
        Ok(())
    }
}

/// Removes namespace `name` that ferry created for a VM whose supervisor
/// died (SIGKILL, host crash), unless a running VM holds it. Returns
/// whether it removed anything.
pub fn remove_leftover_namespace(name: &str) -> Result<bool, NetError> {
    crate::ns::validate_name(name)?;
    let lock_path = PathBuf::from(NS_LOCK_DIR).join(format!("{name}.lock"));
    let Ok(_lock) = plumbing::try_lock(&lock_path, "ferry cleaning up")? else {
        return Ok(false);
    };
    if !crate::ns::exists(name) {
        return Ok(false);
    }
    plumbing::unprovision(name)?;
    Ok(true)
}

impl Drop for VmNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("removing the network of namespace {}: {e}", self.ns.name());
        }
    }
}

/// The guest's filter, in its namespace: what comes in from the tap may
/// reach the gateway forwarder's port (where `FERRY-GW` redirects the
/// guest's connections to its gateway) and answers to connections made to
/// the guest, and be forwarded out of the namespace (NAT) to anywhere but
/// the host itself: not its loopback, not any address it holds (listed
/// now, on every interface), not any ferry namespace link
/// (`10.201.0.0/16`: the host ends and every other VM's namespace).
fn isolate(
    net: &mut VmNetwork,
    rules: &mut Batch,
    g: &GuestNet,
    gw_port: &str,
    dhcp: bool,
) -> Result<(), NetError> {
    let input = Chain {
        table: "filter",
        parent: "INPUT",
        name: "FERRY-GUEST-IN".into(),
    };
    let forward = Chain {
        table: "filter",
        parent: "FORWARD",
        name: "FERRY-GUEST-FWD".into(),
    };
    net.guard_chains.push(input.clone());
    rules.install(&input);
    let gw = format!("{}/32", g.gateway);
    let t = TAP_NAME;
    rules.append(
        &input,
        &[
            "-i",
            t,
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "RETURN",
        ],
    );
    rules.append(
        &input,
        &[
            "-i", t, "-d", &gw, "-p", "tcp", "--dport", gw_port, "-j", "RETURN",
        ],
    );
    if dhcp {
        rules.append(
            &input,
            &[
                "-i", t, "-p", "udp", "--sport", "68", "--dport", "67", "-j", "RETURN",
            ],
        );
    }
    rules.append(&input, &["-i", t, "-j", "DROP"]);
    net.guard_chains.push(forward.clone());
    rules.install(&forward);
    let mut blocked = vec![
        "127.0.0.0/8".to_string(),
        crate::plumbing::POOL_TEXT.to_string(),
    ];
    blocked.extend(nl::host_addresses()?.iter().map(|a| format!("{a}/32")));
    for dest in &blocked {
        rules.append(&forward, &["-i", t, "-d", dest, "-j", "DROP"]);
    }
    Ok(())
}

/// A VM's network whose namespace and tap exist (enough for the engine to
/// start), from [`VmNetwork::prepare`]. Dropping it removes what it made.
pub struct PendingNetwork {
    net: VmNetwork,
    listeners: Vec<std::net::TcpListener>,
    opts: VmNetOptions,
    /// The tap, attached (see [`tap::create`]); ferry's own copy closes
    /// with [`PendingNetwork::finish`].
    tap_fd: Arc<std::os::fd::OwnedFd>,
}

impl PendingNetwork {
    /// The namespace's name.
    pub fn netns_name(&self) -> &str {
        self.net.netns_name()
    }

    /// Its path, for the engine to enter.
    pub fn netns_path(&self) -> PathBuf {
        self.net.netns_path()
    }

    /// The tap the engine attaches the guest to.
    pub fn tap(&self) -> &str {
        self.net.tap()
    }

    /// The tap's descriptor, attached already, for the engine to hand its
    /// process.
    pub fn tap_fd(&self) -> Arc<std::os::fd::OwnedFd> {
        Arc::clone(&self.tap_fd)
    }

    /// The exposures it will serve.
    pub fn exposes(&self) -> &[ExposeSpec] {
        self.net.exposes()
    }

    /// Whether ferry created the namespace for this VM.
    pub fn created_namespace(&self) -> bool {
        self.net.created
    }

    /// Makes the rest: a new namespace's link to the host, the tap's
    /// address, the gateway forwarder, the guest's firewall and the
    /// exposures. On failure everything made is removed.
    pub fn finish(self) -> Result<VmNetwork, NetError> {
        finish(self.net, self.listeners, self.opts)
    }
}

/// Plumbing (for a namespace ferry made), tap address, gateway forwarder
/// and exposures, in a namespace that exists with its tap. On failure
/// `net` is dropped, which removes what was made so far.
fn finish(
    mut net: VmNetwork,
    listeners: Vec<std::net::TcpListener>,
    opts: VmNetOptions,
) -> Result<VmNetwork, NetError> {
    // A namespace made just now has none of ferry's rules: its NAT and the
    // VM's own rules go in with one iptables-restore.
    let mut rules = Batch::default();
    if net.created {
        plumbing::build(&net.ns, &mut rules)?;
    }
    let g = opts.guest;
    nl::configure(Some(&net.ns), TAP_NAME, Some(TAP_MAC), g.gateway, g.prefix)?;
    if let Some(mac) = g.mac {
        // Only time is lost without it: the kernel asks the guest by ARP.
        if let Err(e) = nl::add_neighbour(Some(&net.ns), TAP_NAME, g.guest, mac) {
            tracing::debug!(error = %e, "no neighbour entry for the guest");
        }
    }

    // The gateway forwarder: every TCP connection from the guest to its
    // gateway is redirected to one listener, which dials the host port
    // the guest asked for from the host namespace.
    let gateway = net
        .ns
        .run(|| expose::bind(SocketAddr::new(IpAddr::V4(g.gateway), 0)))??;
    let gw_port = gateway
        .local_addr()
        .map_err(NetError::io("reading the gateway listener's port"))?
        .port()
        .to_string();
    let chain = Chain {
        table: "nat",
        parent: "PREROUTING",
        name: "FERRY-GW".into(),
    };
    net.gateway_chain = Some(chain.clone());
    rules.install(&chain);
    let gw = format!("{}/32", g.gateway);
    rules.append(
        &chain,
        &[
            "-i",
            TAP_NAME,
            "-d",
            &gw,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &gw_port,
        ],
    );
    isolate(&mut net, &mut rules, &g, &gw_port, opts.dhcp)?;
    let fresh = net.created;
    rules.apply(Some(&net.ns), fresh)?;
    let host_ns = Arc::new(crate::ns::current()?);
    let resolve = opts.resolve.unwrap_or_else(|| Arc::new(|_| None));
    let dial_host: Dialer = Arc::new(move |client: &TcpStream| {
        let port = expose::original_dst(client)?.port();
        match resolve(port) {
            Some(addr) => expose::dial_in(&host_ns, addr),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("no VM exposes port {port}: the guest's connection is closed"),
            )),
        }
    });
    net.proxies.push(Proxy::start(
        gateway,
        format!("gateway of {}", net.ns.name()),
        dial_host,
    )?);

    for (spec, listener) in opts.exposes.iter().zip(listeners) {
        let ns_file: Arc<File> = Arc::new(
            net.ns
                .file()
                .try_clone()
                .map_err(NetError::io("duplicating the namespace handle"))?,
        );
        let guest = SocketAddr::new(IpAddr::V4(g.guest), spec.guest_port);
        let admission = net.admission.clone();
        let dial: Dialer = Arc::new(move |_| {
            if !admission.wait(expose::ADMIT_WAIT) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "the VM does not run here yet (it is arriving by a live move)",
                ));
            }
            expose::dial_in(&ns_file, guest)
        });
        net.proxies
            .push(Proxy::start(listener, format!("{spec}"), dial)?);
    }
    Ok(net)
}
