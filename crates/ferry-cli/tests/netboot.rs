//! The real netboot path of a stateless node, as an OpenCHAMI node boots:
//! a PC machine (QEMU `q35`) whose PCI NIC's boot ROM is Debian's iPXE
//! (`ipxe-qemu`) asks DHCP for its address and boot URL; the DHCP server
//! is Debian's `dnsmasq` (`dnsmasq-base`), run by this test in the VM's
//! network namespace (no system service), and it names the boot service's
//! `bootscript?mac=${net0/mac}`; iPXE runs that script (the kernel and
//! initramfs of the `node` blueprint, `ferry.root=` its disk image), and
//! the node comes up with its cloud-init data from the service, as in
//! `nodes_from_bss.rs`. ferry's part is `ferry boot --from-bss URL --mac
//! MAC --netboot`: it checks the boot data first, makes the machine and
//! lets the guest reach the service at its gateway.
//!
//! Opt-in (about two minutes under TCG): `FERRY_TEST_NETBOOT=1 cargo test
//! -p ferry-cli --test netboot`. Without it the test says so and passes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, exec, stop};
use ferry_blueprint::Blueprint;
use ferry_test_support::{
    blueprint, describe, ports, qemu_pids, spawn_until, spawn_until_live, vm_lock_for, KillOnDrop,
};
use serde_json::{json, Value};

const TOKEN: &str = "netboot-test-token";
const NAME: &str = "nbnode01";
const XNAME: &str = "x1000c0s1b0n1";
const MAC: &str = "de:ca:fc:0f:fe:21";
/// The guest's gateway, where it reaches the boot service.
const GATEWAY: &str = "172.100.100.1";
/// Debian's iPXE ROM for a virtio-net PCI NIC.
const ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";

fn enabled() -> bool {
    std::env::var("FERRY_TEST_NETBOOT").as_deref() == Ok("1")
}

fn http(method: &str, url: &str, body: Option<&Value>) -> (u16, String) {
    common::http_json(method, url, body, Some(TOKEN))
}

fn get_json(url: &str) -> Value {
    common::get_json(url, Some(TOKEN))
}

/// A network namespace made for the VM (ferry uses one it is given with
/// `--netns` as it is), removed when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        // A crashed run's namespace of the same name (same pid) goes first.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// dnsmasq as the DHCP server of the VM's tap, in `netns`, as OpenCHAMI
/// runs it for its nodes: iPXE clients (user class `iPXE`) are told to
/// chain to the boot service's script for their MAC. No DNS (`--port=0`),
/// no configuration file, no daemon; the tap appears only when ferry makes
/// it (`--bind-dynamic`).
fn dnsmasq(netns: &str, port: u16, dir: &Path) -> KillOnDrop {
    let script = format!("http://{GATEWAY}:{port}/boot/v1/bootscript?mac=${{net0/mac}}");
    let log = std::fs::File::create(dir.join("dnsmasq.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "dnsmasq", "--no-daemon"])
        .args([
            "--conf-file=/dev/null",
            "--port=0",
            "--no-ping",
            "--log-dhcp",
        ])
        .args(["--interface=tap0", "--bind-dynamic"])
        .arg("--dhcp-range=172.100.100.2,172.100.100.2,255.255.255.252,10m")
        .arg(format!("--dhcp-option=option:router,{GATEWAY}"))
        .arg("--dhcp-userclass=set:ipxe,iPXE")
        .arg(format!("--dhcp-boot=tag:ipxe,{script}"))
        .arg(format!(
            "--dhcp-leasefile={}",
            dir.join("dnsmasq.leases").display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("dnsmasq (apt-get install dnsmasq-base; scripts/setup.sh does)");
    let child = KillOnDrop::new(child);
    ferry_test_support::wait_until(Duration::from_secs(10), "dnsmasq to start", || {
        std::fs::read_to_string(dir.join("dnsmasq.log"))
            .unwrap_or_default()
            .contains("DHCP, IP range")
            .then_some(())
    });
    child
}

#[test]
fn a_node_netboots_through_dnsmasq_ipxe_and_the_boot_script() {
    if !enabled() {
        eprintln!(
            "skipped: the q35 + iPXE netboot test is opt-in (about two minutes under TCG): \
             FERRY_TEST_NETBOOT=1 cargo test -p ferry-cli --test netboot"
        );
        return;
    }
    assert!(
        Path::new(ROM).is_file(),
        "{ROM} is missing: apt-get install ipxe-qemu (scripts/setup.sh does)"
    );
    let bp = Blueprint::load(&blueprint("node")).unwrap();
    let _lock = vm_lock_for(Duration::from_secs(900));
    let test_started = Instant::now();
    let env = env();
    let (store, token) = common::node_boot_store(&env, &bp, TOKEN);
    let port = ports::free_port();
    // Nodes are told to use the service at their gateway, which leads to
    // the service's loopback port.
    let mut svc = Command::new(env!("CARGO_BIN_EXE_ferry"));
    svc.env_remove("FERRY_LOG")
        .args(["boot-service", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--advertise", &format!("http://{GATEWAY}:{port}")])
        .arg("--store")
        .arg(&store)
        .arg("--token-file")
        .arg(&token);
    let _svc = spawn_until(svc, "listening on ", Duration::from_secs(30)).0;
    let url = format!("http://127.0.0.1:{port}");
    let node_url = format!("http://{GATEWAY}:{port}");

    let list = env.state.path().join("nodes.yaml");
    std::fs::write(
        &list,
        format!(
            "nodes:\n- name: {NAME}\n  nid: 21\n  xname: {XNAME}\n  groups: [compute]\n  interfaces:\n  - mac_addr: {MAC}\n    ip_addrs:\n    - name: management\n      ip_addr: 172.16.0.21\n"
        ),
    )
    .unwrap();
    let out = env.run(&[
        "boot-service",
        "load",
        list.to_str().unwrap(),
        "--url",
        &url,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));

    let kernel = |base: &str| {
        format!(
            "{base}/files/vmlinuz#sha256={}",
            common::sha256_hex(&bp.kernel())
        )
    };
    let initrd = |base: &str| {
        format!(
            "{base}/files/initramfs.cpio.gz#sha256={}",
            common::sha256_hex(&bp.initramfs())
        )
    };
    let root = format!(
        "{node_url}/files/node.ext4#sha256={}",
        common::sha256_hex(&bp.disk())
    );
    // The firmware boots the script as it is: the params carry what
    // ferry's guest needs on its command line (its console).
    let (code, body) = http(
        "POST",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({
            "hosts": [XNAME],
            "kernel": kernel(&node_url),
            "initrd": initrd(&node_url),
            "params": format!("console=ttyS0 panic=-1 quiet ferry.root={root}"),
            "cloud-init": {"user-data": {
                "hostname": NAME,
                "write_files": [{
                    "path": "/etc/ferry-node-test",
                    "content": format!("{NAME} netbooted and got this from the boot service\n"),
                }],
            }},
        })),
    );
    assert_eq!(code, 201, "{body}");

    // Bad input, refused before any VM: a MAC the service does not know,
    // and boot data naming the host's loopback (which the firmware would
    // dial in the guest).
    let out = env.run(&[
        "boot",
        "--from-bss",
        &url,
        "--mac",
        "de:ca:fc:0f:fe:97",
        "--netboot",
        "--name",
        "nb-unknown",
    ]);
    common::assert_refused(&env, &out, "nb-unknown", "de:ca:fc:0f:fe:97");
    // A netboot without the VM's network (no DHCP to ask) is refused.
    let out = env.run(&[
        "boot",
        "--from-bss",
        &url,
        "--mac",
        MAC,
        "--netboot",
        "--net",
        "none",
        "--name",
        "nb-nonet",
    ]);
    common::assert_refused(&env, &out, "nb-nonet", "--net none");
    let (code, body) = http(
        "POST",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({
            "macs": ["de:ca:fc:0f:fe:98"],
            "kernel": kernel(&url),
            "initrd": initrd(&url),
            "params": format!("console=ttyS0 ferry.root={root}"),
        })),
    );
    assert_eq!(code, 201, "{body}");
    let out = env.run(&[
        "boot",
        "--from-bss",
        &url,
        "--mac",
        "de:ca:fc:0f:fe:98",
        "--netboot",
        "--name",
        "nb-loopback",
    ]);
    let line = common::assert_refused(&env, &out, "nb-loopback", "cannot reach");
    assert!(
        line.contains(&format!("--advertise http://{GATEWAY}:{port}")),
        "{line}"
    );

    // The netboot: dnsmasq in the VM's namespace, then the VM.
    let ns = Netns::new(&format!("fnb{}", std::process::id()));
    let dns = dnsmasq(&ns.0, port, env.state.path());
    let started = Instant::now();
    let (mut boot, lines) = spawn_until_live(
        &env,
        &[
            "boot",
            "--from-bss",
            &url,
            "--mac",
            MAC,
            "--netboot",
            "--name",
            NAME,
            "--netns",
            &ns.0,
            "--memory-size",
            "512",
            "--live-timeout",
            "420",
        ],
        Duration::from_secs(450),
    );
    eprintln!(
        "{NAME}: from 'ferry boot --netboot' to cloud-init done: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(lines.iter().any(|l| l.contains("netboots")), "{lines:?}");
    // QEMU is a PC with the iPXE ROM on its NIC, booting from the network.
    let pids = qemu_pids(NAME);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", pids[0]))
        .unwrap()
        .replace('\0', " ");
    assert!(
        cmdline.contains("-M q35") && cmdline.contains("-boot n") && cmdline.contains(ROM),
        "{cmdline}"
    );
    assert!(!cmdline.contains("-kernel"), "{cmdline}");
    // dnsmasq leased the address to iPXE with the script's URL.
    let log = std::fs::read_to_string(env.state.path().join("dnsmasq.log")).unwrap();
    assert!(
        log.contains(&format!("DHCPACK(tap0) 172.100.100.2 {MAC}"))
            && log.contains("user class: iPXE"),
        "{log}"
    );
    // The kernel runs with what the service's script gave it (iPXE's
    // `kernel` line: the params, then `xname=`, `nid=`, `BOOTIF=`, `ds=`).
    let proc_cmdline = exec(&env, NAME, "cat /proc/cmdline");
    for want in [
        "initrd=initrd",
        &format!("xname={XNAME}"),
        "nid=21",
        "BOOTIF=01-de-ca-fc-0f-fe-21",
        &format!("ds=nocloud-net;s={node_url}/cloud-init/{MAC}/"),
    ] {
        assert!(proc_cmdline.contains(want), "{want} in {proc_cmdline}");
    }
    // Its NIC is on PCI, with its MAC; its root is the image in RAM.
    assert_eq!(exec(&env, NAME, "cat /sys/class/net/eth0/address"), MAC);
    let bus = exec(&env, NAME, "readlink -f /sys/class/net/eth0/device");
    assert!(bus.contains("/pci0000:00/"), "{bus}");
    let root_dev = exec(&env, NAME, "awk '$2 == \"/\" {print $1}' /proc/mounts");
    assert!(root_dev.starts_with("/dev/loop"), "root is {root_dev}");
    // Live means cloud-init said done, with the service's data.
    assert_eq!(exec(&env, NAME, "cloud-init status"), "status: done");
    assert_eq!(exec(&env, NAME, "hostname"), NAME);
    assert_eq!(
        exec(&env, NAME, "cat /etc/ferry-node-test"),
        format!("{NAME} netbooted and got this from the boot service")
    );
    let out = stop(&mut boot);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(qemu_pids(NAME).is_empty());
    drop(dns);

    // It phoned home as itself; the inventory shows it.
    let homes = get_json(&format!("{url}/cloud-init/phone-home"));
    let home = homes
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["mac"] == MAC)
        .unwrap_or_else(|| panic!("{NAME} did not phone home: {homes}"));
    assert_eq!(home["xname"], XNAME, "{home}");
    assert_eq!(home["data"]["instance_id"], format!("i-{XNAME}"), "{home}");
    let comps = get_json(&format!("{url}/hsm/v2/State/Components?id={XNAME}"));
    assert_eq!(comps["Components"][0]["ID"], XNAME, "{comps}");
    let ifaces = get_json(&format!(
        "{url}/hsm/v2/Inventory/EthernetInterfaces?MACAddress={MAC}"
    ));
    assert_eq!(ifaces[0]["ComponentID"], XNAME, "{ifaces}");
    let bp = get_json(&format!("{url}/boot/v1/bootparameters?name={XNAME}"));
    assert_eq!(
        bp[0]["cloud-init"]["phone-home"]["instance_id"],
        format!("i-{XNAME}"),
        "{bp}"
    );
    eprintln!(
        "netbooted and checked in {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}
