//! `scripts/operator-image.sh`: an OCI image archive of the operator,
//! built without a container daemon. The archive is checked as an image
//! tool reads it (the index names the manifest, the manifest the config
//! and the layer, each blob has the digest and size it is named by), and
//! the layer alone runs the operator: unpacked and entered with `chroot`
//! as the image's unprivileged user, `ferry operator crd` prints the CRD.
//! With `podman` installed, `podman load` takes the archive as well.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_test_support::{describe, workspace_root};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn blob(layout: &Path, digest: &str, size: u64) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(bytes.len() as u64, size, "{digest}: its size");
    let got: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, hex, "the blob named {digest} has another digest");
    bytes
}

/// Runs `cmd` to its end, or kills it after `limit`.
fn run_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            ferry_test_support::send_signal(pid, libc::SIGKILL);
            panic!("{cmd:?} did not end within {limit:?}");
        }
    }
}

#[test]
fn the_operator_image_archive_is_an_oci_image_that_runs_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("ferry-operator.tar");
    let mut build = Command::new("bash");
    build
        .arg(workspace_root().join("scripts/operator-image.sh"))
        .arg(&archive)
        .args(["--tag", "ferry:test"])
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"));
    let out = run_within(build, Duration::from_secs(300));
    assert!(out.status.success(), "{}", describe(&out));

    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    let mut untar = Command::new("tar");
    untar.arg("-xf").arg(&archive).arg("-C").arg(&layout);
    let out = run_within(untar, Duration::from_secs(120));
    assert!(out.status.success(), "{}", describe(&out));

    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(layout.join(name)).unwrap()).unwrap()
    };
    assert_eq!(read("oci-layout")["imageLayoutVersion"], "1.0.0");
    let index = read("index.json");
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );
    let manifest: Value = serde_json::from_slice(&blob(
        &layout,
        entry["digest"].as_str().unwrap(),
        entry["size"].as_u64().unwrap(),
    ))
    .unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let c = &manifest["config"];
    let config: Value = serde_json::from_slice(&blob(
        &layout,
        c["digest"].as_str().unwrap(),
        c["size"].as_u64().unwrap(),
    ))
    .unwrap();
    let l = &manifest["layers"][0];
    let layer_digest = l["digest"].as_str().unwrap();
    blob(&layout, layer_digest, l["size"].as_u64().unwrap());
    assert_eq!(config["rootfs"]["diff_ids"][0], layer_digest);
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/ferry");
    assert_eq!(config["config"]["User"], "65532:65532");
    // Docker's own format, beside it.
    let docker = read("manifest.json");
    assert_eq!(docker[0]["RepoTags"][0], "ferry:test");
    assert_eq!(
        docker[0]["Layers"][0],
        format!(
            "blobs/sha256/{}",
            layer_digest.trim_start_matches("sha256:")
        )
    );

    // The layer alone runs the operator, as the image's user.
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let mut unpack = Command::new("tar");
    unpack
        .arg("-xf")
        .arg(
            layout
                .join("blobs/sha256")
                .join(layer_digest.trim_start_matches("sha256:")),
        )
        .arg("-C")
        .arg(&rootfs);
    let out = run_within(unpack, Duration::from_secs(120));
    assert!(out.status.success(), "{}", describe(&out));
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("chroot");
    let mut crd = Command::new(chroot);
    crd.arg("--userspec=65532:65532")
        .arg(&rootfs)
        .args(["/usr/local/bin/ferry", "operator", "crd"])
        .env_clear()
        .env("PATH", "/usr/local/bin")
        .env("FERRY_STATE", "/tmp/ferry");
    let out = run_within(crd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", describe(&out));
    let deployed = std::fs::read_to_string(workspace_root().join("deploy/crd.yaml")).unwrap();
    let body: String = deployed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        body.trim_end()
    );

    // An image tool loads it, when one is installed.
    if Command::new("podman").arg("--version").output().is_ok() {
        let storage = dir.path().join("podman");
        let mut load = Command::new("podman");
        load.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs", "load", "-i"])
            .arg(&archive);
        let out = run_within(load, Duration::from_secs(300));
        assert!(out.status.success(), "podman load: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ferry:test"), "{text}");
    } else {
        eprintln!("podman is not installed: the archive was not loaded by an image tool");
    }
}
