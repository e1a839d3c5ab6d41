#!/usr/bin/env python3
"""bench/rawvm.py: the raw engine's side of a bench, driven by plain QEMU.

Restores the very guest ferry restored, with plain QEMU and plain QMP
commands, so that a bench can put ferry's figure beside the engine's own in
one run. What is the same as ferry's run: the QEMU binary and its whole
command line (captured from /proc/<pid>/cmdline of ferry's QEMU), the
kernel, initramfs and memory file (the same files in ferry's section cache,
mapped the same way), the device state, the disk (a fresh qcow2 overlay on
the same backing file), the tap in a network namespace with the addresses
and MAC ferry gives it, and a userspace TCP proxy from a host port into that
namespace, as ferry's `--expose` is. What ferry adds and this does not: its
own start-up, the VM directory and record, namespace and firewall set-up
during the run (done here before the clock starts), the agent's resume
handshake, the package verification beside the run.

Usage (as root):
  rawvm.py capture PID OUTDIR          save the QEMU of ferry's VM: argv,
                                       device state, disk backing
  rawvm.py restore CAPDIR WORKDIR PORT GUESTPORT
      prepares everything, prints "ready", waits for a line on stdin, then
      starts QEMU (prints "started"), restores the state over QMP
      (x-ignore-shared, migrate-incoming exec:cat, cont: the calls ferry's
      engine makes) and prints "running MS" (ms from start to running);
      serves the proxy until stdin closes or it gets SIGTERM, then stops
      QEMU and removes the namespace.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
TAP_MAC = "52:54:00:fe:44:00"  # ferry_net::TAP_MAC
GATEWAY = "172.100.100.1/30"  # ferry_net::GATEWAY_ADDR / GUEST_PREFIX
GUEST = "172.100.100.2"  # ferry_net::GUEST_ADDR


def die(msg):
    print(f"rawvm: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def capture(pid, out):
    os.makedirs(out, exist_ok=True)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    vmdir = None
    for a in argv:
        path = a[len("unix:"):].split(",")[0]
        if a.startswith("unix:") and path.endswith("/qmp.sock"):
            vmdir = os.path.dirname(path)
    if vmdir is None:
        die(f"no -qmp unix:<dir>/qmp.sock in the command line of pid {pid}")
    disk = os.path.join(vmdir, "disk.qcow2")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", disk],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if not backing:
        die(f"{disk} has no backing file")
    shutil.copyfile(os.path.join(vmdir, "device-state.in"), os.path.join(out, "device-state"))
    with open(os.path.join(out, "capture.json"), "w") as f:
        json.dump(
            {
                "argv": argv,
                "vmdir": vmdir,
                "backing": backing,
                "backing_format": info.get("backing-filename-format", "qcow2"),
                "size": info["virtual-size"],
            },
            f,
            indent=1,
        )


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    die(f"QMP socket {path} did not open")
                time.sleep(0.002)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "error" in r:
                die(f"QMP {name}: {r['error'].get('desc')}")
            if "return" in r:
                return r["return"]


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        die(f"setns: {os.strerror(ctypes.get_errno())}")


def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    for s in (b,):
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(client, nsfd, guest_port):
    # This thread enters the VM's namespace (setns is per thread), dials
    # the guest there, and relays both ways: what ferry's proxy does.
    setns(nsfd)
    # A fresh SYN every 100 ms while the guest does not answer, as ferry's
    # proxy dials (ferry_net::expose::dial_quickly), not the kernel's 1 s
    # retransmission: the floor is the engine's, not a lost SYN's.
    up = None
    deadline = time.monotonic() + 5
    while up is None and time.monotonic() < deadline:
        try:
            up = socket.create_connection((GUEST, guest_port), timeout=0.1)
        except socket.timeout:
            continue
        except OSError:
            break
    if up is None:
        client.close()
        return
    up.settimeout(None)
    t = threading.Thread(target=pump, args=(up, client), daemon=True)
    t.start()
    pump(client, up)
    t.join()
    client.close()
    up.close()


def restore(cap, work, port, guest_port):
    with open(os.path.join(cap, "capture.json")) as f:
        c = json.load(f)
    ns = f"ferry-rawvm-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    disk = os.path.join(work, "disk.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", c["backing"], "-F",
         c["backing_format"], disk, str(c["size"])],
        check=True,
    )
    shutil.copyfile(os.path.join(cap, "device-state"), os.path.join(work, "device-state"))
    argv = [a.replace(c["vmdir"], work).replace("ferry:", "rawvm:", 1) if a.startswith("ferry:") or c["vmdir"] in a else a for a in c["argv"]]
    # FERRY_RAWVM_NEIGH=1: a permanent neighbour entry for the guest, so
    # that a dial made before the guest runs does not wait for an ARP retry.
    neigh = ()
    mac = next((p[4:] for a in argv for p in a.split(",") if p.startswith("mac=")), None)
    if os.environ.get("FERRY_RAWVM_NEIGH") == "1" and mac:
        neigh = (["ip", "-n", ns, "neigh", "replace", GUEST, "lladdr", mac, "dev", "tap0",
                  "nud", "permanent"],)
    qemu = None
    lst = None
    try:
        for cmd in (
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"],
            ["ip", "-n", ns, "link", "set", "tap0", "address", TAP_MAC],
            ["ip", "-n", ns, "addr", "add", GATEWAY, "dev", "tap0"],
            ["ip", "-n", ns, "link", "set", "tap0", "up"],
        ) + neigh:
            subprocess.run(cmd, check=True)
        nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", port))
        lst.listen(64)

        def accept():
            while True:
                try:
                    cl, _ = lst.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(cl, nsfd, guest_port), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        print("ready", flush=True)
        if not sys.stdin.readline():
            return
        t0 = time.monotonic()
        qemu = subprocess.Popen(
            ["ip", "netns", "exec", ns] + argv,
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(work, "console.log"), "wb"),
            stderr=open(os.path.join(work, "qemu.err"), "wb"),
        )
        print("started", flush=True)
        q = Qmp(os.path.join(work, "qmp.sock"), t0 + 60)
        q.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "x-ignore-shared", "state": True}])
        q.cmd("migrate-incoming", uri=f"exec:cat {os.path.join(work, 'device-state')}")
        while True:
            st = q.cmd("query-migrate").get("status")
            if st == "completed":
                break
            if st == "failed":
                die("the restore failed (see qemu.err)")
            time.sleep(0.002)
        q.cmd("cont")
        print(f"running {int((time.monotonic() - t0) * 1000)}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.stdin.readline()
    finally:
        if lst is not None:
            lst.close()
        if qemu is not None:
            qemu.terminate()
            try:
                qemu.wait(10)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "capture":
        capture(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "restore":
        restore(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        die("usage: rawvm.py capture PID OUTDIR | restore CAPDIR WORKDIR PORT GUESTPORT")


if __name__ == "__main__":
    main()
