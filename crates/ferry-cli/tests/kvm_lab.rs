//! On a host with a working KVM, `--accel auto` picks KVM. This host's own
//! KVM cannot run Linux, so the test runs ferry inside the lab VM of
//! `../shared/tools/kvm-lab.sh` (QEMU TCG with AMD-V exposed, where
//! `/dev/kvm` really works), booted by `scripts/kvm-lab.sh`, which adds the
//! TSC fix the lab guest needs on a busy host. Slow (minutes; the lab's rootfs is built once),
//! hence opt-in: `FERRY_KVM_LAB=1 scripts/test.sh`, or
//! `cargo test -p ferry-cli --test kvm_lab -- --ignored`.

use std::process::Command;

use ferry_test_support::{agent_path, blueprint, describe, workspace_root};

#[test]
#[ignore = "slow: runs ferry inside the KVM lab VM; FERRY_KVM_LAB=1 scripts/test.sh runs it"]
fn auto_picks_kvm_where_kvm_boots_linux() {
    let lab = workspace_root().join("scripts/kvm-lab.sh");
    assert!(lab.is_file(), "{} is missing", lab.display());
    let _ = agent_path();
    let share = tempfile::Builder::new()
        .prefix("ferry-lab-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ferry"), share.path().join("ferry")).unwrap();
    let bp = blueprint("tiny");
    let dest = share.path().join("tiny");
    std::fs::create_dir_all(&dest).unwrap();
    for f in ["kernel", "initramfs", "disk.ext4", "blueprint.toml"] {
        std::fs::copy(bp.join(f), dest.join(f)).unwrap();
    }
    let out = Command::new("bash")
        .arg(&lab)
        .arg(share.path())
        .arg("FERRY_STATE=/tmp/state FERRY_CACHE=/tmp/cache ./ferry boot --blueprint tiny --accel auto --exit-when-live --live-timeout 300")
        .output()
        .expect("run kvm-lab.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout.lines().any(|l| l == "accel: kvm"),
        "{}",
        describe(&out)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("live in ")),
        "{}",
        describe(&out)
    );
}
