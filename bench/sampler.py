#!/usr/bin/env python3
"""What the machine and its QEMUs were doing, sampled, to explain a client's
stall after the fact (bench/lab's dump with FERRY_BENCH_LAB_SAMPLE=1).

  sampler.py record OUT [PERIOD_MS]   every PERIOD_MS (default 200) until
                                      killed, one line to OUT
  sampler.py around OUT GAPS MIN_MS   the lines of OUT from 1 s before to
                                      0.5 s after each gap in GAPS (bench/
                                      migrate's migrate-gaps.log: epoch ms
                                      at its end, its length) longer than
                                      MIN_MS

A sample line: epoch ms; the machine's CPU time in that period (user,
system, iowait, idle, in 1/100 s); /proc/vmstat's major faults, pages
scanned, file refaults, dirty and writeback pages; the pressure stall time
(PSI, ms, where the kernel has it); then per QEMU its main thread and
every thread that ran, is runnable or is in D state in that period (QEMU
names its vCPU threads only with `debug-threads=on`), as
`pid/tid:name:state:cpu[:wchan]`
(cpu in 1/100 s of that period; wchan for a thread not running). A QEMU's
first line says which VM it is (its -name and its state directory).

Learnt from nothing but /proc: it runs anywhere bench/lab runs.
"""
import os
import re
import sys
import time

VMSTAT = ("pgmajfault", "pgscan_kswapd", "pgscan_direct", "workingset_refault_file")
LEVELS = ("nr_dirty", "nr_writeback")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def vmstat():
    out = {}
    for line in read("/proc/vmstat").splitlines():
        k, _, v = line.partition(" ")
        if k in VMSTAT or k in LEVELS:
            out[k] = int(v)
    return out


def cpu():
    f = read("/proc/stat").split("\n", 1)[0].split()[1:]
    f = [int(x) for x in f]
    return (f[0] + f[1], f[2], f[4], f[3])  # user+nice, system, iowait, idle


def psi():
    out = []
    for r in ("cpu", "memory", "io"):
        m = re.search(r"some .*total=(\d+)", read(f"/proc/pressure/{r}"))
        out.append(int(m.group(1)) if m else 0)
    return out


def threads(seen, out):
    """QEMUs' threads: (pid, tid) -> (name, state, ticks, wchan)."""
    now = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        comm = read(f"/proc/{pid}/comm").strip()
        if not comm.startswith("qemu-system"):
            continue
        if pid not in seen:
            cmd = read(f"/proc/{pid}/cmdline").split("\0")
            name = cmd[cmd.index("-name") + 1] if "-name" in cmd else "?"
            where = re.search(r"/(state-[\w.-]+|rawvm[\w.-]*|ferry-bench-[\w.-]+)/", " ".join(cmd))
            out.write(f"# qemu pid {pid}: -name {name} {where.group(1) if where else ''}\n")
            seen.add(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            stat = read(f"/proc/{pid}/task/{tid}/stat")
            if not stat:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            rest = stat[stat.rindex(")") + 2:].split()
            state, ticks = rest[0], int(rest[11]) + int(rest[12])
            wchan = read(f"/proc/{pid}/task/{tid}/wchan") if state != "R" else ""
            now[(pid, tid)] = (name.replace(" ", "_"), state, ticks, wchan)
    return now


def record(path, period_ms):
    seen = set()
    with open(path, "w", buffering=1) as out:
        last_cpu, last_vm, last_psi, last_t = cpu(), vmstat(), psi(), {}
        while True:
            time.sleep(period_ms / 1000)
            c, v, p, t = cpu(), vmstat(), psi(), threads(seen, out)
            dc = [a - b for a, b in zip(c, last_cpu)]
            dv = [v.get(k, 0) - last_vm.get(k, 0) for k in VMSTAT]
            dp = [(a - b) // 1000 for a, b in zip(p, last_psi)]
            th = []
            for (pid, tid), (name, state, ticks, wchan) in sorted(t.items()):
                d = ticks - last_t.get((pid, tid), (0, 0, ticks))[2]
                # QEMU names its vCPU threads only with debug-threads=on:
                # the busy ones, the blocked ones and the main one.
                if not (tid == pid or state in "RD" or d > 0):
                    continue
                th.append(f"{pid}/{tid}:{name}:{state}:{d}" + (f":{wchan}" if wchan and wchan != "0" else ""))
            out.write(
                f"{int(time.time() * 1000)} cpu={'/'.join(map(str, dc))}"
                f" majflt={dv[0]} scan={dv[1]}+{dv[2]} refault={dv[3]}"
                f" dirty={v.get('nr_dirty', 0)} wb={v.get('nr_writeback', 0)}"
                f" psi={'/'.join(map(str, dp))} | {' '.join(th)}\n"
            )
            last_cpu, last_vm, last_psi, last_t = c, v, p, t


def around(path, gaps, min_ms):
    windows = []
    for line in open(gaps):
        f = line.split()
        if len(f) == 2 and f[0].isdigit() and int(f[1]) > min_ms:
            end, length = int(f[0]), int(f[1])
            windows.append((end - length - 1000, end + 500, end, length))
    lines = open(path).read().splitlines()
    for line in lines:
        if line.startswith("#"):
            print(line)
    for lo, hi, end, length in windows:
        print(f"== a gap of {length} ms ending at {end}")
        for line in lines:
            t = line.split(" ", 1)[0]
            if t.isdigit() and lo <= int(t) <= hi:
                print(line)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        record(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 200)
    elif len(sys.argv) == 5 and sys.argv[1] == "around":
        around(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
