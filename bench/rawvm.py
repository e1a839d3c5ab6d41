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
namespace, as ferry's `--expose` is (its bytes relayed in native code, a
thread per direction, as ferry's are: bench/relay.c). What ferry adds and this does not: its
own start-up, the VM directory and record, namespace and firewall set-up
during the run (done here before the clock starts), the agent's resume
handshake, the package verification beside the run.

Usage (as root; from the repository's root):
  rawvm.py capture PID OUTDIR          save the QEMU of ferry's VM: argv,
                                       device state (none for a VM that
                                       booted), disk backing
  rawvm.py restore CAPDIR WORKDIR PORT GUESTPORT
      prepares everything, prints "ready", waits for a line on stdin, then
      starts QEMU (prints "started"), restores the state over QMP
      (x-ignore-shared, migrate-incoming exec:cat, cont: the calls ferry's
      engine makes) and prints "running MS" (ms from start to running);
      serves the proxy until stdin closes or it gets SIGTERM, then stops
      QEMU and removes the namespace. With the capture of a VM that booted
      (no device state), QEMU boots the same way instead, without the -S
      that ferry starts it with: "started" only.
      Once running, each line "save MODE PATH" pauses the guest and saves
      it, RAM included, into the file PATH (migrate file:; MODE plain,
      mapped-ram, or multifd: mapped-ram with 2 multifd channels) and
      prints "saved {json}"; any other line ends. With
      FERRY_RAWVM_STATE_FILE=PATH (and FERRY_RAWVM_STATE_MODE=MODE) the
      restore loads such a file instead of the captured device state
      (bench/state-file).
  rawvm.py build-relay
      builds bench/relay.c into target/bench-relay/relay.so (restore and
      live do it themselves when a C compiler is there) and prints its path
  rawvm.py live CAPDIR WORKDIR GUESTPORT PORT,PORT,... MIGPORT
      a raw live migration chain: restores the captured guest as `restore`
      does behind a proxy on the first PORT (prints "ready", waits for a
      line, prints "running MS"); then each "move" line on stdin migrates
      it to a new QEMU behind the next PORT (round robin) and prints one
      JSON line with the move's figures and moments. Both QEMUs run in the
      host's network namespace and migrate over tcp:127.0.0.1:MIGPORT (the
      disk over NBD on tcp:127.0.0.1:MIGPORT+1); each
      opens its tap in its own namespace (made before the move starts, as
      ferry's peer makes its own before it receives) and gets it as fd=N.
      A move is the engine's plain sequence, what ferry's engine does
      minus its own protocol around it: the destination starts paused with
      `-incoming defer`, anonymous memory (as ferry's engine gives a
      guest received private; a shared guest's gets a fresh memory file)
      and a fresh disk, exports its disk
      over NBD (nbd-server-start, block-export-add) and listens
      (migrate-incoming tcp:); the source mirrors its disk into that export
      (blockdev-mirror, sync full, until ready), sets the same
      downtime-limit (50 ms) and max-bandwidth (10 GiB/s) as ferry, and
      migrates (migrate tcp:); on completion the source finishes the mirror
      (block-job-cancel) and its proxy closes its client connections (as
      ferry's source closes its ports); the destination stops the export
      and continues (cont). stdin closing or SIGTERM ends everything.
      Under TCG both QEMUs run without transparent huge pages, as ferry's
      engine runs them (FERRY_QEMU_THP=1: with, for both).
      Every wait for QEMU (a restore, the mirror, a copy) asks it after
      each of its events (the migration's `events` capability is on, as
      ferry's engine sets it) and at least every 100 ms, as ferry's
      engine does, instead of asking every millisecond. The proxy's
      sockets have TCP_NODELAY, as ferry's.
      With FERRY_RAWVM_POSTCOPY=1 (or =preempt) both QEMUs get the
      postcopy-ram capability (and postcopy-preempt) and the source asks
      for postcopy (migrate-start-postcopy) once its first pass is over;
      once its guest has stopped, the mirror is finished and the
      destination continues while the rest of memory still arrives; the
      move's JSON says whether it went postcopy ("postcopy").
"""

import ctypes
import fcntl
import re
import select
import struct
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
QUERY_FALLBACK = 0.1  # s between asks with no event: ferry_qemu's QUERY_FALLBACK


def die(msg):
    print(f"rawvm: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def capture(pid, out):
    os.makedirs(out, exist_ok=True)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    # ferry hands QEMU the tap it made, attached, as a descriptor; a replay
    # opens the tap of its own namespace by name (made before the clock
    # starts, it attaches at once), and `live` hands it as a descriptor.
    argv = [re.sub(r"^tap,id=net0,fd=\d+$", "tap,id=net0,ifname=tap0,script=no,downscript=no", a) for a in argv]
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
    # A booted VM has no device state: its capture boots the same way.
    state = os.path.join(vmdir, "device-state.in")
    if os.path.exists(state):
        shutil.copyfile(state, os.path.join(out, "device-state"))
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
    """A QMP connection that counts QEMU's events, so that a wait can
    sleep until the next one (`wait_event`) instead of asking QEMU every
    millisecond: ferry's engine waits that way (ferry-qemu, "Waiting for
    QEMU" in docs/engine.md), and in the KVM lab, whose one CPU is
    emulated, this driver's polls took the CPU its guest and client
    needed."""

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
        self.buf = b""
        self.events = 0
        self.line()
        self.cmd("qmp_capabilities")

    def line(self, timeout=None):
        """The next message from QEMU; None if `timeout` (s) passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                ready, _, _ = select.select([self.s], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    return None
            chunk = self.s.recv(65536)
            if not chunk:
                die("QEMU closed its QMP connection (see qemu.err)")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, name, /, **args):
        self.s.sendall((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
        while True:
            r = self.line()
            if "event" in r:
                self.events += 1
            elif "error" in r:
                die(f"QMP {name}: {r['error'].get('desc')}")
            elif "return" in r:
                return r["return"]

    def wait_event(self, timeout=QUERY_FALLBACK):
        """Returns once QEMU has sent an event since the last call (at
        once if one came during a command), or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.events:
            r = self.line(max(0.0, deadline - time.monotonic()))
            if r is None:
                return
            if "event" in r:
                self.events += 1
        self.events = 0


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        die(f"setns: {os.strerror(ctypes.get_errno())}")


# The relay's source, and where it is built (from the repository's root,
# where the benches run).
RELAY_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.c")
RELAY_LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "target", "bench-relay", "relay.so")


def build_relay():
    """Builds bench/relay.c into RELAY_LIB unless it is there and newer;
    returns its path. bench/lab builds it on the host (the lab has no
    compiler) and brings it along."""
    if os.path.exists(RELAY_LIB) and (not os.path.exists(RELAY_SRC)
                                      or os.path.getmtime(RELAY_LIB) >= os.path.getmtime(RELAY_SRC)):
        return RELAY_LIB
    if not shutil.which("cc"):
        die(f"{RELAY_LIB} is missing and there is no C compiler to build it from {RELAY_SRC}: "
            "apt-get install -y gcc (or build it where there is one: python3 bench/rawvm.py build-relay)")
    os.makedirs(os.path.dirname(RELAY_LIB), exist_ok=True)
    tmp = RELAY_LIB + ".tmp"
    r = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, RELAY_SRC],
                       capture_output=True, text=True)
    if r.returncode != 0:
        die(f"building {RELAY_SRC} failed: {r.stderr.strip()}")
    os.replace(tmp, RELAY_LIB)
    return RELAY_LIB


_relay = None


def load_relay():
    """Builds (if need be) and loads the relay: before any clock starts."""
    global _relay
    if _relay is None:
        lib = ctypes.CDLL(build_relay())
        lib.relay.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.relay.restype = ctypes.c_int
        _relay = lib.relay


def relay(a, b):
    """Relays both ways between sockets a and b until both directions end
    (bench/relay.c: native code, as ferry's proxy is; ctypes lets go of
    the interpreter's lock for the call)."""
    load_relay()
    a.setblocking(True)
    b.setblocking(True)
    if _relay(a.fileno(), b.fileno()) != 0:
        die("the relay could not start a thread")


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
    # No Nagle on either side, as ferry's proxy (ferry_net::expose): a
    # request-response client could otherwise wait for the peer's delayed
    # ACK (up to 40 ms) whenever a command is split over two writes. (It
    # was not why the raw engine's writer acknowledges fewer writes per
    # move in the KVM lab: bench/README.md, 2026-12-06 14:55-17:05.)
    for s in (client, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relay(client, up)
    client.close()
    up.close()


def restore(cap, work, port, guest_port):
    load_relay()
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
    boot = not os.path.exists(os.path.join(cap, "device-state"))
    if not boot:
        shutil.copyfile(os.path.join(cap, "device-state"), os.path.join(work, "device-state"))
    argv = [a.replace(c["vmdir"], work).replace("ferry:", "rawvm:", 1) if a.startswith("ferry:") or c["vmdir"] in a else a for a in c["argv"]]
    if boot:
        # ferry starts a booting QEMU paused (-S) and continues it over QMP
        # once it is set up; plain QEMU just runs.
        argv = [a for a in argv if a != "-S"]
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
        if boot:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            sys.stdin.readline()
            return
        q = Qmp(os.path.join(work, "qmp.sock"), t0 + 60)
        state_file = os.environ.get("FERRY_RAWVM_STATE_FILE")
        if state_file:
            # A whole-RAM state that `save` wrote (bench/state-file).
            set_state_mode(q, os.environ.get("FERRY_RAWVM_STATE_MODE", "plain"))
            q.cmd("migrate-incoming", uri=f"file:{state_file}")
        else:
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "x-ignore-shared", "state": True},
                                {"capability": "events", "state": True}])
            q.cmd("migrate-incoming", uri=f"exec:cat {os.path.join(work, 'device-state')}")
        wait_status(q, "restoring", lambda s: s == "completed", 120)
        q.cmd("cont")
        print(f"running {int((time.monotonic() - t0) * 1000)}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            words = sys.stdin.readline().split()
            if len(words) != 3 or words[0] != "save":
                break
            save(q, words[1], words[2])
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


STATE_MODES = ("plain", "mapped-ram", "multifd")


def set_state_mode(q, mode):
    """Capabilities for a whole-RAM state in a file: the plain stream,
    `mapped-ram` (each RAM page at its own offset of the file), or
    mapped-ram with multifd (2 channels)."""
    if mode not in STATE_MODES:
        die(f"state mode {mode!r}: one of {', '.join(STATE_MODES)}")
    q.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "x-ignore-shared", "state": False},
        {"capability": "mapped-ram", "state": mode != "plain"},
        {"capability": "multifd", "state": mode == "multifd"},
        # The saves' and loads' waits are woken by QEMU's events.
        {"capability": "events", "state": True},
    ])
    if mode == "multifd":
        q.cmd("migrate-set-parameters", **{"multifd-channels": 2})


def save(q, mode, path):
    """Pauses the guest and saves it, RAM included, into `path` (migrate
    file:); prints one JSON line with the time and the file's sizes."""
    status = q.cmd("query-status")["status"]
    if status == "postmigrate":  # after an earlier save: QEMU refuses another
        q.cmd("cont")
    if q.cmd("query-status")["status"] == "running":
        q.cmd("stop")
    set_state_mode(q, mode)
    if os.path.exists(path):
        os.unlink(path)
    t = time.monotonic()
    q.cmd("migrate", uri=f"file:{path}")
    r = wait_status(q, "saving", lambda s: s == "completed", 600)
    ms = int((time.monotonic() - t) * 1000)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    synced_ms = int((time.monotonic() - t) * 1000)
    st = os.stat(path)
    ram = r.get("ram", {})
    print("saved " + json.dumps({
        "mode": mode, "ms": ms, "synced_ms": synced_ms,
        "file_mib": round(st.st_size / 2**20, 1),
        "allocated_mib": round(st.st_blocks * 512 / 2**20, 1),
        "ram_pages_mib": round(ram.get("normal", 0) * 4096 / 2**20, 1),
        "zero_pages": ram.get("duplicate", 0),
    }), flush=True)


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
MIGRATE_DOWNTIME_MS = 50  # ferry_engine::LiveLimits::default().max_downtime
MIGRATE_BANDWIDTH = 10 << 30  # ferry_engine::LiveLimits::default().max_bandwidth


def now_ms():
    return int(time.time() * 1000)


def open_tap(nsfd, name):
    """Opens the tap `name` of the namespace behind `nsfd` (from a thread
    that enters it; setns is per thread) and returns the descriptor, for a
    QEMU that runs in the host's namespace."""
    got = {}

    def run():
        try:
            setns(nsfd)
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            got["fd"] = fd
        except BaseException as e:  # noqa: BLE001 (reported below)
            got["err"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "fd" not in got:
        die(f"opening {name} in its namespace: {got.get('err')}")
    return got["fd"]


class Slot:
    """One place a raw VM can run: a namespace with the tap and addresses
    ferry gives a VM, a directory, and a proxy from a host port into the
    namespace that can drop its clients (a source that let go)."""

    def __init__(self, root, index, port, guest_port):
        self.ns = f"ferry-rawmig-{os.getpid()}-{index}"
        self.dir = os.path.join(root, f"slot{index}")
        self.guest_port = guest_port
        self.qemu = None
        self.qmp = None
        self.clients = []
        self.lock = threading.Lock()
        os.makedirs(self.dir, exist_ok=True)
        for cmd in (
            ["ip", "netns", "add", self.ns],
            ["ip", "-n", self.ns, "link", "set", "lo", "up"],
            ["ip", "-n", self.ns, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr"],
            ["ip", "-n", self.ns, "link", "set", "tap0", "address", TAP_MAC],
            ["ip", "-n", self.ns, "addr", "add", GATEWAY, "dev", "tap0"],
            ["ip", "-n", self.ns, "link", "set", "tap0", "up"],
        ):
            subprocess.run(cmd, check=True)
        self.nsfd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        self.lst = socket.socket()
        self.lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lst.bind(("127.0.0.1", port))
        self.lst.listen(64)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                cl, _ = self.lst.accept()
            except OSError:
                return
            with self.lock:
                self.clients.append(cl)
            threading.Thread(target=serve, args=(cl, self.nsfd, self.guest_port), daemon=True).start()

    def let_go(self):
        """Closes the port and every client connection through it."""
        try:
            self.lst.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lst.close()
        with self.lock:
            for c in self.clients:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def start(self, argv):
        tap = open_tap(self.nsfd, "tap0")
        argv = [re.sub(r"ifname=tap0(,script=no)?(,downscript=no)?", f"fd={tap}", a) if a.startswith("tap,") else a
                for a in argv]
        self.qemu = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.dir, "console.log"), "wb"),
            stderr=open(os.path.join(self.dir, "qemu.err"), "wb"),
            pass_fds=(tap,),
            preexec_fn=no_huge_pages if tcg_without_huge_pages(argv) else None,
        )
        os.close(tap)
        self.qmp = Qmp(os.path.join(self.dir, "qmp.sock"), time.monotonic() + 60)

    def destroy(self):
        self.let_go()
        if self.qemu is not None:
            self.qemu.terminate()
            try:
                self.qemu.wait(10)
            except subprocess.TimeoutExpired:
                self.qemu.kill()
                self.qemu.wait()
            self.qemu = None
        os.close(self.nsfd)
        subprocess.run(["ip", "netns", "del", self.ns], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def tcg_without_huge_pages(argv):
    """Whether a live chain's QEMU runs without transparent huge pages,
    as ferry's engine starts every QEMU under TCG (unless FERRY_QEMU_THP=1):
    a destination's anonymous memory would otherwise be cleared 2 MiB at
    a time on the vCPU's thread at the guest's first writes, a cost of
    QEMU's that ferry removed and this column would wrongly count as
    ferry's gain (docs/engine.md, "Huge pages under TCG")."""
    tcg = any(a.startswith("tcg") for a, prev in zip(argv[1:], argv) if prev == "-accel")
    return tcg and os.environ.get("FERRY_QEMU_THP") != "1"


def no_huge_pages():
    """In the child before exec: PR_SET_THP_DISABLE, kept across exec."""
    if ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) != 0:
        os._exit(125)


def wait_status(q, what, done, timeout=600, on_change=None, each=None):
    """Asks query-migrate after each of QEMU's events (and at least every
    QUERY_FALLBACK s) until `done(status)`; `each` sees every answer first."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        info = q.cmd("query-migrate")
        st = info.get("status")
        if st != last and on_change:
            on_change(st)
        last = st
        if each:
            each(info)
        if done(st):
            return info
        if st in ("failed", "cancelled"):
            die(f"{what}: migration {st}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            die(f"{what}: still '{st}' after {timeout} s")
        q.wait_event()


def live(cap, work, guest_port, ports, mig_port):
    load_relay()
    with open(os.path.join(cap, "capture.json")) as f:
        c = json.load(f)
    os.makedirs(work, exist_ok=True)
    vmdir = c["vmdir"]
    node = next((p[len("node-name="):] for a in c["argv"] for p in a.split(",") if p.startswith("node-name=")), None)
    if node is None:
        die("no node-name= for the disk in the captured command line")
    mem_size = next((p[len("size="):] for a in c["argv"] if a.startswith("memory-backend-file,")
                     for p in a.split(",") if p.startswith("size=")), None)
    # A destination's guest memory is anonymous, as ferry's engine gives a
    # guest received private (a file on disk slows the copy several times;
    # userfaultfd, which postcopy's destination waits on, does not take
    # one); a shared guest's gets a fresh memory file.
    shared_memory = any(a.startswith("memory-backend-file,") and ",share=on" in a for a in c["argv"])

    # The disk as ferry's live moves have it (FERRY_RAWVM_DISK=raw, the
    # default): a sparse raw file at the source (ferry's: its lazily
    # fetched disk, whole) and an empty one at the destination, zeros
    # written there punched as holes (ferry's -drive for a raw disk). With
    # =qcow2, as until 2026-12-07: the source a qcow2 overlay of the
    # captured clone's backing file, the destination a fresh qcow2, whose
    # zeros cost only metadata (on the KVM lab's tmpfs ferry's copy took
    # 42-105 s against 10-19 s for this one).
    disk_kind = os.environ.get("FERRY_RAWVM_DISK", "raw")
    if disk_kind not in ("raw", "qcow2"):
        die(f"FERRY_RAWVM_DISK={disk_kind}: use raw or qcow2")

    def disk_arg(a, slot):
        if disk_kind == "raw" and "disk.qcow2" in a:
            a = re.sub(r"file=[^,]*disk\.qcow2,format=qcow2",
                       f"file={os.path.join(slot.dir, 'disk.raw')},format=raw,detect-zeroes=unmap", a)
            if "disk.raw" not in a:
                die(f"cannot make the disk raw in {a}")
        return a

    postcopy = os.environ.get("FERRY_RAWVM_POSTCOPY", "")
    if postcopy not in ("", "1", "preempt"):
        die(f"FERRY_RAWVM_POSTCOPY={postcopy}: use 1 or preempt")
    caps = []
    if postcopy:
        caps = [{"capability": "postcopy-ram", "state": True}]
        if postcopy == "preempt":
            caps.append({"capability": "postcopy-preempt", "state": True})

    def argv_for(slot, restoring):
        out = []
        for a in c["argv"]:
            if a.startswith("ferry:"):
                a = "rawvm:" + a[len("ferry:"):]
            a = disk_arg(a.replace(vmdir, slot.dir), slot)
            if not restoring and a.startswith("memory-backend-file,"):
                if shared_memory:
                    a = re.sub(r"mem-path=[^,]*", f"mem-path={os.path.join(slot.dir, 'memory')}", a)
                else:
                    a = f"memory-backend-ram,id=mem,size={mem_size}"
            out.append(a)
        if not restoring:
            out.append("-S")
        return out

    slots = []
    index = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        src = Slot(work, index, ports[0], guest_port)
        slots.append(src)
        if disk_kind == "raw":
            subprocess.run(["qemu-img", "convert", "-q", "-f", c["backing_format"], "-O", "raw", "-S", "4k",
                            c["backing"], os.path.join(src.dir, "disk.raw")], check=True)
            os.truncate(os.path.join(src.dir, "disk.raw"), int(c["size"]))
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", c["backing"], "-F",
                            c["backing_format"], os.path.join(src.dir, "disk.qcow2"), str(c["size"])], check=True)
        shutil.copyfile(os.path.join(cap, "device-state"), os.path.join(src.dir, "device-state"))
        print("ready", flush=True)
        if not sys.stdin.readline():
            return
        t0 = time.monotonic()
        src.start(argv_for(src, True))
        src.qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True},
                                  {"capability": "events", "state": True}])
        src.qmp.cmd("migrate-incoming", uri=f"exec:cat {os.path.join(src.dir, 'device-state')}")
        wait_status(src.qmp, "restoring", lambda s: s == "completed", 120)
        src.qmp.cmd("cont")
        # Later moves copy all of memory: a restored guest's memory file is
        # not shared with any destination.
        src.qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": False}])
        print(f"running {int((time.monotonic() - t0) * 1000)}", flush=True)
        while sys.stdin.readline().strip() == "move":
            index += 1
            m = {}
            dst = Slot(work, index, ports[index % len(ports)], guest_port)
            slots.append(dst)
            if disk_kind == "raw":
                with open(os.path.join(dst.dir, "disk.raw"), "wb") as f:
                    f.truncate(int(c["size"]))
            else:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(dst.dir, "disk.qcow2"),
                                str(c["size"])], check=True)
            if mem_size and shared_memory:
                with open(os.path.join(dst.dir, "memory"), "wb") as f:
                    f.truncate(int(mem_size.rstrip("K")) * 1024 if mem_size.endswith("K") else int(mem_size))
            m["start"] = now_ms()
            dst.start(argv_for(dst, False))
            # The disk crosses TCP, as between two hosts (and as ferry's
            # does): a Unix socket was a same-machine shortcut no move
            # between hosts has (until 2026-12-07).
            nbd = {"host": "127.0.0.1", "port": str(mig_port + 1)}
            dst.qmp.cmd("nbd-server-start", addr={"type": "inet", "data": nbd})
            dst.qmp.cmd("block-export-add", type="nbd", id="rawvm-incoming-disk", **{"node-name": node},
                        name="disk0", writable=True)
            dst.qmp.cmd("migrate-set-capabilities", capabilities=caps + [{"capability": "events", "state": True}])
            dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{mig_port}")
            m["copy"] = now_ms()
            q = src.qmp
            # discard=unmap on both nodes, as ferry's engine adds its
            # mirror's target: without it the mirror's zero writes reach
            # the destination as "no hole" and it allocates every zero of
            # the disk (since 2026-12-07, in both).
            q.cmd("blockdev-add", driver="raw", **{"node-name": "rawvm-mirror-target"}, discard="unmap",
                  file={"driver": "nbd", "export": "disk0", "discard": "unmap", "server": {"type": "inet", **nbd}})
            q.cmd("blockdev-mirror", device="disk0", **{"job-id": "rawvm-mirror"}, target="rawvm-mirror-target",
                  sync="full", **{"auto-dismiss": False})
            deadline = time.monotonic() + 600
            disk_len = 0
            while True:
                job = next((j for j in q.cmd("query-block-jobs") if j["device"] == "rawvm-mirror"), None)
                if job is None or job.get("status") in ("concluded", "aborting"):
                    die(f"the disk copy stopped: {job}")
                if job.get("ready"):
                    disk_len = job.get("len", 0)
                    break
                if time.monotonic() > deadline:
                    die("the disk copy did not get ready in 600 s")
                q.wait_event()
            m["mirrored"] = now_ms()
            q.cmd("migrate-set-parameters", **{"downtime-limit": MIGRATE_DOWNTIME_MS,
                                               "max-bandwidth": MIGRATE_BANDWIDTH})
            if caps:
                q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate", uri=f"tcp:127.0.0.1:{mig_port}")

            def seen(st):
                if st not in ("setup", "active") and "switch" not in m:
                    m["switch"] = now_ms()

            if postcopy:
                # Postcopy once the first pass is over (QEMU's second dirty
                # sync): the destination then runs with what the pass sent
                # and asks for the rest as it touches it. A copy that
                # converges before that ends as precopy.
                def ask(info):
                    if (info.get("status") == "active" and "postcopy_asked" not in m
                            and info.get("ram", {}).get("dirty-sync-count", 0) >= 2):
                        q.cmd("migrate-start-postcopy")
                        m["postcopy_asked"] = now_ms()

                info = wait_status(q, "sending", lambda st: st in ("postcopy-active", "completed"),
                                   on_change=seen, each=ask)
                m["postcopy"] = info.get("status") == "postcopy-active"
                # The disk's last writes go before the destination runs:
                # wait for the source's guest to stop.
                while q.cmd("query-status").get("status") == "running":
                    q.wait_event()
            else:
                info = wait_status(q, "sending", lambda s: s == "completed", on_change=seen)
            m.setdefault("switch", now_ms())
            # QEMU 7.2 says `completed` a moment before it has reckoned the
            # copy's total time and downtime (ferry's engine asks again the
            # same way): woken by the event, the first answer has 0.
            figures_by = time.monotonic() + 0.5
            while info.get("status") == "completed" and not info.get("total-time") \
                    and time.monotonic() < figures_by:
                time.sleep(0.001)
                info = q.cmd("query-migrate")
            q.cmd("block-job-cancel", device="rawvm-mirror")
            while True:
                job = next((j for j in q.cmd("query-block-jobs") if j["device"] == "rawvm-mirror"), None)
                if job is None or job.get("status") == "concluded":
                    break
                q.wait_event()
            if job is not None:
                q.cmd("job-dismiss", id="rawvm-mirror")
            # The source lets go of the destination's export.
            q.cmd("blockdev-del", **{"node-name": "rawvm-mirror-target"})
            src.let_go()
            m["end"] = now_ms()
            if m.get("postcopy"):
                # The destination has the devices and runs (paused, as it
                # was started with -S) while its memory still arrives.
                deadline = time.monotonic() + 120
                while dst.qmp.cmd("query-status").get("status") == "inmigrate":
                    if time.monotonic() > deadline:
                        die("receiving: the destination did not take the devices in 120 s")
                    dst.qmp.wait_event()
            else:
                wait_status(dst.qmp, "receiving", lambda s: s == "completed", 120)
            dst.qmp.cmd("block-export-del", id="rawvm-incoming-disk")
            dst.qmp.cmd("nbd-server-stop")
            dst.qmp.cmd("cont")
            m["live"] = now_ms()
            if m.get("postcopy"):
                info = wait_status(q, "sending the rest", lambda s: s == "completed", 300)
                wait_status(dst.qmp, "receiving the rest", lambda s: s == "completed", 300)
                m["postcopy_done"] = now_ms()
            m["total_ms"] = info.get("total-time")
            m["downtime_ms"] = info.get("downtime")
            m["ram_bytes"] = info.get("ram", {}).get("transferred")
            # The disk's length, not bytes sent: the job's counters do not
            # tell the zero areas it skipped.
            m["disk_len"] = disk_len
            m["switch_ms"] = m["live"] - m["switch"]
            print(json.dumps(m), flush=True)
            src.destroy()
            slots.remove(src)
            src = dst
    finally:
        for s in slots:
            s.destroy()
        shutil.rmtree(work, ignore_errors=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "capture":
        capture(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "restore":
        restore(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) == 2 and sys.argv[1] == "build-relay":
        print(build_relay())
    elif len(sys.argv) == 7 and sys.argv[1] == "live":
        live(sys.argv[2], sys.argv[3], int(sys.argv[4]), [int(p) for p in sys.argv[5].split(",")],
             int(sys.argv[6]))
    else:
        die("usage: rawvm.py capture PID OUTDIR | restore CAPDIR WORKDIR PORT GUESTPORT"
            " | live CAPDIR WORKDIR GUESTPORT PORT,PORT,... MIGPORT | build-relay")


if __name__ == "__main__":
    main()
