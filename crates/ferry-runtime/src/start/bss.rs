//! Start source: a node's boot data from a BSS-compatible boot service
//! (`ferry boot --from-bss URL --mac MAC`).
//!
//! The service is asked for the MAC's boot data; its kernel, initrd and
//! root image (`root=live:URL` in the params, as OpenCHAMI names a node's
//! image) are downloaded into the VM's new directory, each checked against
//! the `#sha256=` its URL carries, and only then is anything started. A
//! root image named as `ferry.root=URL` instead is the guest's to fetch
//! (its initramfs downloads it into RAM: a stateless node); ferry only
//! checks that it is there, and the VM's disk is an empty placeholder. The
//! guest boots them with ferry's own command line followed by the params,
//! its NIC has that MAC, and it reaches the boot service and the loopback
//! URLs of its params at its gateway: those URLs are rewritten to the
//! gateway, and its gateway forwarder leads exactly those ports to the
//! host's loopback (the guest isolation chains still refuse everything
//! else).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_agent_proto::Liveness;
use ferry_blueprint::NetworkConfig;
use ferry_bootsvc::fetch::{self, FetchBootError, FetchOptions};
use ferry_engine::{AccelChoice, Engine, Provenance};

use super::{How, StartPlan};
use crate::error::StartError;
use crate::events::{Event, EventSink};
use crate::owner::{Held, SaveInfo};
use crate::package_meta::PackageMeta;
use crate::vm::{BootImage, ConsoleSink, GatewayForward, NetChoice, VmConfig};
use crate::vmdir::VmDir;
use crate::Paths;

/// What ferry's guest needs on its command line before the boot
/// parameters: its console (the VM's console log) and a panic that powers
/// off instead of hanging.
pub const FERRY_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Guest memory when `--memory-size` is not given.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// How long the guest may take to be live when `--live-timeout` is not
/// given.
pub const DEFAULT_LIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Tries of each request while the service does not answer, and the delay
/// after the first (doubled after each): 0.5 + 1 + 2 + 4 s, then the error.
pub const ATTEMPTS: u32 = 5;
/// See [`ATTEMPTS`].
pub const FIRST_DELAY: Duration = Duration::from_millis(500);

/// The directory inside the VM's directory that holds what was fetched.
pub const BOOT_FILES: &str = "boot";

/// What a boot from a boot service is asked for.
#[derive(Clone)]
pub struct BssStart {
    /// The service's base URL (`http://host:port`).
    pub url: String,
    /// The node's MAC.
    pub mac: String,
    /// TLS for an `https://` service (`--ca`, a client certificate).
    pub tls: Option<ferry_transport::ClientTls>,
    /// The VM's name.
    pub name: String,
    /// Guest memory; [`DEFAULT_MEMORY_MIB`] if `None`.
    pub memory_mib: Option<u64>,
    /// vCPUs; one if `None`.
    pub cpus: Option<u32>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Where the console is copied besides its log.
    pub console: Option<ConsoleSink>,
    /// How long to wait for live; [`DEFAULT_LIVE_TIMEOUT`] if `None`.
    pub live_timeout: Option<Duration>,
    /// Its network.
    pub net: NetChoice,
    /// When the operation started.
    pub started: Instant,
    /// Boot through the NIC's firmware (`--netboot`): the guest gets its
    /// boot script over DHCP and iPXE, as a bare-metal node does, instead
    /// of ferry loading the kernel. ferry still fetches and checks the boot
    /// data first (an unknown MAC or a file that is not there starts no
    /// VM), at its URLs as the guest reaches them.
    pub netboot: bool,
}

/// The plan of a boot from a boot service: the boot data fetched and
/// checked into the VM's directory, the command line and forwards made,
/// the accelerator chosen. Nothing runs yet; on an error the directory is
/// gone again.
///
/// # Errors
/// [`StartError::BootData`] for a malformed MAC or URL, a service that
/// does not answer after [`ATTEMPTS`] tries, an unknown MAC, a download
/// that fails or whose digest differs, and boot data ferry's guest cannot
/// boot (no initrd or no root image); the name, engine and files' errors.
pub fn plan(
    engine: &dyn Engine,
    paths: &Paths,
    opts: &BssStart,
    events: &dyn EventSink,
) -> Result<StartPlan<'static>, StartError> {
    // Bad input is refused before anything is made or asked.
    let mac = parse_guest_mac(&opts.mac)?;
    let service = service_forward(&opts.url)?;
    let memory_mib = opts.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    let cpus = opts.cpus.unwrap_or(1);
    if cpus == 0 || cpus > 64 {
        return Err(StartError::CpusOutOfRange(cpus));
    }
    let dir = VmDir::create(paths, &opts.name)?;
    match plan_in(engine, &dir, opts, events, &mac, service, memory_mib, cpus) {
        Ok(mut plan) => {
            plan.dir = Some(dir);
            Ok(plan)
        }
        Err(e) => {
            dir.remove();
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_in(
    engine: &dyn Engine,
    dir: &VmDir,
    opts: &BssStart,
    events: &dyn EventSink,
    mac: &str,
    service: Option<GatewayForward>,
    memory_mib: u64,
    cpus: u32,
) -> Result<StartPlan<'static>, StartError> {
    let t = Instant::now();
    let url = opts.url.trim_end_matches('/').to_string();
    let fetched = fetch::fetch_boot_tls(
        &FetchOptions {
            url: url.clone(),
            mac: mac.to_string(),
            dest: dir.path().join(BOOT_FILES),
            attempts: ATTEMPTS,
            first_delay: FIRST_DELAY,
            // A netbooted guest's URLs name its gateway, which leads to
            // this host's loopback: ferry checks them there.
            host_alias: opts
                .netboot
                .then(|| (NetworkConfig::default().gateway, "127.0.0.1".to_string())),
        },
        opts.tls.as_ref(),
        |attempt, delay, why| {
            events.emit(Event::Warning {
                message: format!(
                    "the boot service at {url} did not answer ({why}); try {} of {ATTEMPTS} in {:.1} s",
                    attempt + 1,
                    delay.as_secs_f64()
                ),
            })
        },
    )?;
    let unusable = |detail: &str| {
        StartError::BootData(FetchBootError::BadBootData {
            mac: mac.to_string(),
            detail: detail.to_string(),
        })
    };
    let initramfs = fetched.initrd.clone().ok_or_else(|| {
        unusable("it names no initrd; ferry's guest boots a ferry initramfs (a blueprint's initramfs.cpio.gz)")
    })?;
    let guest_fetches_root = fetch::ferry_root_url(&fetched.params).is_some();
    let disk = match (&fetched.root, guest_fetches_root) {
        (Some(_), true) => {
            return Err(unusable(
                "its params name two root images (root=live: and ferry.root=); name one",
            ))
        }
        (Some(root), false) => root.clone(),
        // The guest downloads its root into RAM and keeps nothing: its disk
        // is an empty placeholder (every ferry VM has one).
        (None, true) => empty_disk(&dir.path().join(BOOT_FILES))?,
        (None, false) => return Err(unusable(
            "its params name no root image; ferry's guest takes its root file system from its disk or from a URL: add root=live:URL or ferry.root=URL (a blueprint's disk image) to them",
        )),
    };
    let fetched_files: &[&std::path::Path] = if guest_fetches_root {
        &[&fetched.kernel, &initramfs]
    } else {
        &[&fetched.kernel, &initramfs, &disk]
    };
    let bytes: u64 = fetched_files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let message = if guest_fetches_root {
        format!(
                "fetched the boot data of {mac} from {url}: kernel and initrd, {} MiB, checked; the guest fetches its root image (ferry.root=) into RAM",
                bytes >> 20
            )
    } else {
        format!(
                "fetched the boot data of {mac} from {url}: kernel, initrd and root image, {} MiB, checked",
                bytes >> 20
            )
    };
    events.emit(Event::Notice {
        message: match opts.netboot {
            true => format!(
                "{message}; the guest netboots them itself (q35, iPXE, DHCP on its network)"
            ),
            false => message,
        },
    });
    events.emit(Event::Phase {
        phase: "boot-data-fetched".into(),
        ms: t.elapsed().as_millis() as u64,
    });
    let network = NetworkConfig::default();
    let gateway: Ipv4Addr = network
        .gateway
        .parse()
        .map_err(|_| StartError::Internal("the default gateway is not an address".into()))?;
    let (cmdline, mut forwards) = if opts.netboot {
        // The firmware boots the script as the service gives it: nothing
        // is rewritten, so its URLs must be ones the guest reaches.
        let urls = format!("{} {}", fetched.kernel_url, fetched.params);
        let forwards = netboot_forwards(&urls, gateway).map_err(|d| unusable(&d))?;
        (fetched.params.clone(), forwards)
    } else {
        let (params, forwards) =
            rewrite_params(&fetched.params, gateway).map_err(|d| unusable(&d))?;
        let cmdline = format!("{FERRY_CMDLINE} {params}").trim_end().to_string();
        (cmdline, forwards)
    };
    if let Some(s) = service {
        add_forward(&mut forwards, s).map_err(|d| unusable(&d))?;
    }
    let image = BootImage {
        kernel: fetched.kernel.clone(),
        initramfs: initramfs.clone(),
        cmdline: cmdline.clone(),
        disk: disk.clone(),
        source: format!("{url} (MAC {mac})"),
        network: network.clone(),
        disk_server: None,
        guest_mac: Some(mac.to_string()),
        gateway_forwards: forwards,
        netboot: opts.netboot,
    };
    let accel = engine.choose_accel(opts.accel, &image.probe())?;
    let config = VmConfig {
        name: opts.name.clone(),
        memory_mib,
        cpus,
        accel: accel.accel,
        console: opts.console.clone(),
        net: opts.net.clone(),
    };
    let meta = PackageMeta {
        ferry_version: env!("CARGO_PKG_VERSION").into(),
        written_unix: 0,
        generation: 0,
        provenance: Provenance {
            engine: engine.name().to_string(),
            engine_version: String::new(),
            cpu_model: String::new(),
            accel: accel.accel,
            memory_mib,
            memory_extra_kib: 0,
            shell_port: true,
            cpus,
        },
        recipe: if opts.netboot { "netboot" } else { "from-bss" }.into(),
        cmdline,
        network,
        // The agent judges liveness by its own configuration (on the
        // root image); the boot data does not say.
        liveness: Liveness::None,
        memory_in_state: false,
    };
    let disk_size = std::fs::metadata(&disk).map(|d| d.len()).unwrap_or(0);
    Ok(StartPlan {
        name: opts.name.clone(),
        save: SaveInfo {
            meta,
            kernel: fetched.kernel,
            initramfs,
            base_package: None,
            private_memory: false,
            disk_size,
            adopt_cache: None,
        },
        image,
        config,
        accel,
        how: How::Boot,
        dir: None,
        prepare: None,
        live_timeout: opts.live_timeout.unwrap_or(DEFAULT_LIVE_TIMEOUT),
        started: opts.started,
        background_check: None,
        held: Held::default(),
        record: None,
    })
}

/// Size of the placeholder disk of a guest that fetches its root image.
const EMPTY_DISK_BYTES: u64 = 1 << 20;

/// A placeholder disk in `dir`: sparse, all zeros, never mounted.
fn empty_disk(dir: &std::path::Path) -> Result<std::path::PathBuf, StartError> {
    let path = dir.join("empty.img");
    let made = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::File::create(&path))
        .and_then(|f| f.set_len(EMPTY_DISK_BYTES));
    made.map_err(|e| crate::error::FileError::at(&path)(e))?;
    Ok(path)
}

/// The MAC for the guest's NIC, normalised (`aa:bb:cc:dd:ee:ff`): six
/// octets, and unicast (a NIC cannot have a multicast address).
fn parse_guest_mac(text: &str) -> Result<String, StartError> {
    let mac = ferry_bootsvc::ids::parse_mac(text).map_err(FetchBootError::BadMac)?;
    let first = u8::from_str_radix(&mac[..2], 16).unwrap_or(0);
    if first & 1 == 1 {
        return Err(StartError::BootData(FetchBootError::BadMac(
            ferry_bootsvc::ids::IdError::Mac(format!(
                "{text} (a multicast address; a NIC's MAC must be unicast: the first octet even)"
            )),
        )));
    }
    Ok(mac)
}

/// The forward the boot service itself needs (when it is on this host's
/// loopback), after checking that `url` is an `http://host[:port]` or
/// `https://` URL. An `https://` service gets none: the guest cannot speak
/// TLS to it (nor hold its CA), so it reaches only the plain URLs the
/// params name (`ferry boot-service --node-listen`).
fn service_forward(url: &str) -> Result<Option<GatewayForward>, StartError> {
    let bad = |why: &str| StartError::BadBssUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    if let Some(rest) = url.strip_prefix("https://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        split_authority(authority).ok_or_else(|| bad("no host:port in it"))?;
        return Ok(None);
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("it must start with http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = split_authority(authority).ok_or_else(|| bad("no host:port in it"))?;
    Ok(loopback(&host).map(|ip| GatewayForward {
        port,
        to: SocketAddr::new(ip, port),
    }))
}

/// `host[:port]` (IPv6 in brackets); the port defaults to 80.
fn split_authority(authority: &str) -> Option<(String, u16)> {
    let authority = authority.rsplit('@').next()?;
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (authority, 80),
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The address a loopback host names (`localhost`, `127.0.0.0/8`, `::1`).
fn loopback(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    match host.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if a.is_loopback() => Some(IpAddr::V4(a)),
        IpAddr::V6(a) if a == Ipv6Addr::LOCALHOST => Some(IpAddr::V6(a)),
        _ => None,
    }
}

fn add_forward(forwards: &mut Vec<GatewayForward>, f: GatewayForward) -> Result<(), String> {
    match forwards.iter().find(|o| o.port == f.port) {
        Some(o) if o.to == f.to => Ok(()),
        Some(o) => Err(format!(
            "it names two host services on port {} ({} and {}); the guest reaches both at its gateway's port {}",
            f.port, o.to, f.to, f.port
        )),
        None => {
            forwards.push(f);
            Ok(())
        }
    }
}

/// The `http://` URLs in `text`, as (host, port, the whole authority).
fn http_authorities(text: &str) -> Vec<(String, u16)> {
    let mut found = Vec::new();
    for word in text.split_whitespace() {
        let mut rest = word;
        while let Some(at) = rest.find("http://") {
            let url = &rest[at + "http://".len()..];
            let end = url
                .find(['/', '?', '#', ';', ',', '"', '\''])
                .unwrap_or(url.len());
            if let Some(hp) = split_authority(&url[..end]) {
                found.push(hp);
            }
            rest = &url[end..];
        }
    }
    found
}

/// The forwards a netbooted guest needs for the URLs in `text` (its boot
/// script's kernel URL and params): every URL at its gateway leads to the
/// same port on this host's loopback. A URL on loopback is refused: the
/// firmware and the guest would dial themselves (a netboot's script is
/// not rewritten, as iPXE runs it).
pub fn netboot_forwards(text: &str, gateway: Ipv4Addr) -> Result<Vec<GatewayForward>, String> {
    let mut forwards = Vec::new();
    for (host, port) in http_authorities(text) {
        if loopback(&host).is_some() {
            return Err(format!(
                "it names http://{host}:{port}/..., which a netbooted guest cannot reach (the firmware runs the script as it is, and the guest's loopback is its own): name the files at the guest's gateway, and start the service with --advertise http://{gateway}:{port}"
            ));
        }
        if host == gateway.to_string() {
            add_forward(
                &mut forwards,
                GatewayForward {
                    port,
                    to: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                },
            )?;
        }
    }
    Ok(forwards)
}

/// The params with every `http://` URL on this host's loopback rewritten
/// to the guest's gateway (same port), and the forwards that makes.
/// Other URLs stay as they are.
pub fn rewrite_params(
    params: &str,
    gateway: Ipv4Addr,
) -> Result<(String, Vec<GatewayForward>), String> {
    let mut forwards = Vec::new();
    let mut words = Vec::new();
    for word in params.split_whitespace() {
        let mut out = String::new();
        let mut rest = word;
        while let Some(at) = rest.find("http://") {
            let (before, url) = rest.split_at(at + "http://".len());
            out.push_str(before);
            let end = url
                .find(['/', '?', '#', ';', ',', '"', '\''])
                .unwrap_or(url.len());
            let authority = &url[..end];
            match split_authority(authority).and_then(|(host, port)| Some((loopback(&host)?, port)))
            {
                Some((ip, port)) => {
                    add_forward(
                        &mut forwards,
                        GatewayForward {
                            port,
                            to: SocketAddr::new(ip, port),
                        },
                    )?;
                    out.push_str(&format!("{gateway}:{port}"));
                }
                None => out.push_str(authority),
            }
            rest = &url[end..];
        }
        out.push_str(rest);
        words.push(out);
    }
    Ok((words.join(" "), forwards))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(172, 100, 100, 1);

    #[test]
    fn loopback_urls_go_to_the_gateway() {
        let (p, f) = rewrite_params(
            "console=ttyS0 ds=nocloud-net;s=http://127.0.0.1:27778/cloud-init/aa:bb:cc:00:11:22/ root=live:http://localhost:9000/r.img#sha256=ab x=http://10.0.0.9:80/k y=http://[::1]/z",
            GW,
        )
        .unwrap();
        assert_eq!(
            p,
            "console=ttyS0 ds=nocloud-net;s=http://172.100.100.1:27778/cloud-init/aa:bb:cc:00:11:22/ root=live:http://172.100.100.1:9000/r.img#sha256=ab x=http://10.0.0.9:80/k y=http://172.100.100.1:80/z"
        );
        let want: Vec<GatewayForward> = [
            (27778, "127.0.0.1:27778"),
            (9000, "127.0.0.1:9000"),
            (80, "[::1]:80"),
        ]
        .iter()
        .map(|(port, to)| GatewayForward {
            port: *port,
            to: to.parse().unwrap(),
        })
        .collect();
        assert_eq!(f, want);
    }

    #[test]
    fn a_netboot_forwards_its_gateway_urls_and_refuses_loopback() {
        let f = netboot_forwards(
            "http://172.100.100.1:8080/k ferry.root=http://172.100.100.1:8080/d#sha256=ab ds=nocloud-net;s=http://172.100.100.1:9000/ci/ x=http://10.0.0.9/k",
            GW,
        )
        .unwrap();
        let ports: Vec<(u16, String)> = f.iter().map(|f| (f.port, f.to.to_string())).collect();
        assert_eq!(
            ports,
            [
                (8080, "127.0.0.1:8080".into()),
                (9000, "127.0.0.1:9000".into())
            ]
        );
        let e = netboot_forwards("http://127.0.0.1:8080/k", GW).unwrap_err();
        assert!(e.contains("--advertise http://172.100.100.1:8080"), "{e}");
    }

    #[test]
    fn two_services_on_one_port_are_refused() {
        assert!(rewrite_params("a=http://127.0.0.1:80/ b=http://127.0.0.2/", GW).is_err());
        assert!(rewrite_params("a=http://127.0.0.1:80/ b=http://localhost/", GW).is_ok());
    }

    #[test]
    fn macs_are_checked() {
        assert_eq!(
            parse_guest_mac("DE-CA-FC-0F-FE-E1").unwrap(),
            "de:ca:fc:0f:fe:e1"
        );
        assert!(parse_guest_mac("de:ca:fc:0f:fe").is_err());
        assert!(parse_guest_mac("01:00:5e:00:00:01").is_err());
    }

    #[test]
    fn the_service_url_is_checked() {
        assert_eq!(
            service_forward("http://127.0.0.1:27778").unwrap(),
            Some(GatewayForward {
                port: 27778,
                to: "127.0.0.1:27778".parse().unwrap()
            })
        );
        assert_eq!(service_forward("http://10.1.2.3:27778/").unwrap(), None);
        assert_eq!(service_forward("https://127.0.0.1:27778/").unwrap(), None);
        assert!(service_forward("https://").is_err());
        assert!(service_forward("ftp://127.0.0.1").is_err());
        assert!(service_forward("http://:12").is_err());
    }
}
