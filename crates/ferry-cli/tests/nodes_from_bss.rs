//! Three stateless nodes from one boot service, as an OpenCHAMI cluster
//! boots them: `ferry boot-service load` of a three-node list (as `ochami
//! discover static` reads it), boot parameters per node naming the `node`
//! blueprint's kernel and initramfs and its disk image as `ferry.root=URL`
//! (the initramfs fetches it into RAM), and cloud-init user-data asking
//! each node for its hostname, a user with a key and a file. Each node is
//! booted with `ferry boot --from-bss`, one after the other, with the
//! service restarted (same store) between the second and the third; each
//! must come up live (cloud-init done) with what its user-data asked for,
//! and phone home; the inventory shows all three.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{env, error_line, exec, stop};
use ferry_blueprint::Blueprint;
use ferry_test_support::{
    blueprint, describe, ports, qemu_pids, spawn_until, spawn_until_live, vm_lock_for, KillOnDrop,
};
use serde_json::{json, Value};

const TOKEN: &str = "nodes-test-token";

/// (name, xname, MAC) of the three nodes.
const NODES: [(&str, &str, &str); 3] = [
    ("node01", "x1000c0s0b0n1", "de:ca:fc:0f:fe:01"),
    ("node02", "x1000c0s0b0n2", "de:ca:fc:0f:fe:02"),
    ("node03", "x1000c0s0b0n3", "de:ca:fc:0f:fe:03"),
];

/// `ferry boot-service` on `127.0.0.1:port` with `store`, until it listens.
fn service(store: &Path, token: &Path, port: u16) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env_remove("FERRY_LOG")
        .args(["boot-service", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--store")
        .arg(store)
        .arg("--token-file")
        .arg(token);
    spawn_until(cmd, "listening on ", Duration::from_secs(30)).0
}

fn http(method: &str, url: &str, body: Option<&Value>) -> (u16, String) {
    common::http_json(method, url, body, Some(TOKEN))
}

fn get_json(url: &str) -> Value {
    common::get_json(url, Some(TOKEN))
}

/// The node list as `ochami discover static` reads it.
fn nodes_yaml() -> String {
    let mut y = String::from("nodes:\n");
    for (i, (name, xname, mac)) in NODES.iter().enumerate() {
        y.push_str(&format!(
            "- name: {name}\n  nid: {nid}\n  xname: {xname}\n  groups: [compute]\n  interfaces:\n  - mac_addr: {mac}\n    ip_addrs:\n    - name: management\n      ip_addr: 172.16.0.{nid}\n",
            nid = i + 1
        ));
    }
    y
}

fn key_of(name: &str) -> String {
    format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerryNodeTestKeyOnly ops@{name}")
}

#[test]
fn three_nodes_boot_from_the_boot_service_with_their_cloud_init_data() {
    // The node blueprint (Debian + cloud-init) is built before the lock:
    // the first build runs debootstrap.
    let bp = Blueprint::load(&blueprint("node")).unwrap();
    let _lock = vm_lock_for(Duration::from_secs(1200));
    let test_started = Instant::now();
    let env = env();
    let (store, token) = common::node_boot_store(&env, &bp, TOKEN);
    let port = ports::free_port();
    let mut svc = service(&store, &token, port);
    let url = format!("http://127.0.0.1:{port}");

    let list = env.state.path().join("nodes.yaml");
    std::fs::write(&list, nodes_yaml()).unwrap();
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

    let kernel = format!(
        "{url}/files/vmlinuz#sha256={}",
        common::sha256_hex(&bp.kernel())
    );
    let initrd = format!(
        "{url}/files/initramfs.cpio.gz#sha256={}",
        common::sha256_hex(&bp.initramfs())
    );
    let root = format!(
        "{url}/files/node.ext4#sha256={}",
        common::sha256_hex(&bp.disk())
    );
    for (name, xname, _) in NODES {
        let (code, body) = http(
            "POST",
            &format!("{url}/boot/v1/bootparameters"),
            Some(&json!({
                "hosts": [xname],
                "kernel": kernel,
                "initrd": initrd,
                "params": format!("ferry.root={root}"),
                "cloud-init": {"user-data": {
                    "hostname": name,
                    "users": [{"name": "ops", "ssh_authorized_keys": [key_of(name)]}],
                    "write_files": [{
                        "path": "/etc/ferry-node-test",
                        "content": format!("{name} got this from the boot service\n"),
                    }],
                }},
            })),
        );
        assert_eq!(code, 201, "{body}");
    }

    // A root image that is not there starts no VM (the guest would fetch
    // it; ferry checks first).
    let (code, body) = http(
        "POST",
        &format!("{url}/boot/v1/bootparameters"),
        Some(&json!({
            "macs": ["de:ca:fc:0f:fe:99"],
            "kernel": kernel,
            "initrd": initrd,
            "params": format!("ferry.root={url}/files/missing.ext4"),
        })),
    );
    assert_eq!(code, 201, "{body}");
    let out = env.run(&[
        "boot",
        "--from-bss",
        &url,
        "--mac",
        "de:ca:fc:0f:fe:99",
        "--name",
        "node-missing",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let line = error_line(&out);
    assert!(
        line.contains("missing.ext4") && line.contains("HTTP 404"),
        "{line}"
    );
    assert!(!env.vm_dir("node-missing").exists());
    assert!(qemu_pids("node-missing").is_empty());

    for (i, (name, xname, mac)) in NODES.into_iter().enumerate() {
        if i == 2 {
            // Restarted between two boots: the third node's data (written
            // before) comes from the store.
            drop(svc);
            svc = service(&store, &token, port);
        }
        let started = Instant::now();
        let (mut boot, lines) = spawn_until_live(
            &env,
            &[
                "boot",
                "--from-bss",
                &url,
                "--mac",
                mac,
                "--name",
                name,
                "--memory-size",
                "512",
                "--live-timeout",
                "300",
            ],
            Duration::from_secs(330),
        );
        eprintln!(
            "{name}: from 'ferry boot --from-bss' to cloud-init done: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("the guest fetches its root image (ferry.root=) into RAM")),
            "{lines:?}"
        );
        // Live means cloud-init said done.
        assert_eq!(exec(&env, name, "cloud-init status"), "status: done");
        assert_eq!(
            exec(&env, name, "hostname"),
            name,
            "the user-data's hostname"
        );
        assert_eq!(
            exec(&env, name, "cat /etc/ferry-node-test"),
            format!("{name} got this from the boot service")
        );
        assert_eq!(
            exec(&env, name, "cat /home/ops/.ssh/authorized_keys"),
            key_of(name)
        );
        // The root is the image in RAM (a loop device), not the disk.
        let root_dev = exec(&env, name, "awk '$2 == \"/\" {print $1}' /proc/mounts");
        assert!(root_dev.starts_with("/dev/loop"), "root is {root_dev}");
        assert_eq!(exec(&env, name, "cat /sys/class/net/eth0/address"), mac);
        let out = stop(&mut boot);
        assert!(out.status.success(), "{}", describe(&out));

        // It phoned home to the boot service, as itself.
        let homes = get_json(&format!("{url}/cloud-init/phone-home"));
        let home = homes
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["mac"] == mac)
            .unwrap_or_else(|| panic!("{name} did not phone home: {homes}"));
        assert_eq!(home["xname"], xname, "{home}");
        assert_eq!(home["data"]["instance_id"], format!("i-{xname}"), "{home}");
    }

    // The inventory shows the three nodes, their interfaces, and what
    // each phoned home in its boot parameters.
    let comps = get_json(&format!("{url}/hsm/v2/State/Components"));
    let mut ids: Vec<String> = comps["Components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ID"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, NODES.map(|(_, x, _)| x.to_string()), "{comps}");
    let ifaces = get_json(&format!("{url}/hsm/v2/Inventory/EthernetInterfaces"));
    for (_, xname, mac) in NODES {
        assert!(
            ifaces
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["MACAddress"] == mac && f["ComponentID"] == xname),
            "{ifaces}"
        );
        let bp = get_json(&format!("{url}/boot/v1/bootparameters?name={xname}"));
        assert_eq!(
            bp[0]["cloud-init"]["phone-home"]["instance_id"],
            format!("i-{xname}"),
            "{bp}"
        );
    }
    eprintln!(
        "three nodes booted and checked in {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}
