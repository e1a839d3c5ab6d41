#!/usr/bin/env python3
"""bench/plot.py: draws the benches' pictures as SVG, standard library only.

  bench/plot.py timeline --acks FILE --gaps FILE --events FILE --title TEXT --out FILE.svg
      bench/migrate: a client's acknowledged writes over time, one row per
      migration: the whole migration on the left, the switch up close on the
      right, the migration's moments marked and the longest gap drawn.
  bench/plot.py spread --data FILE --title TEXT --out FILE.svg [--mark LABEL=MS]...
      bench/resume: every run's time, one row per case (a dot per run, the
      quartile box, the median), on a log scale when the cases differ by
      more than 10x; --mark draws a dashed reference line (a target).

Inputs (all times epoch milliseconds; lines starting with # are skipped):
  acks    "<bucket start> <acks in the bucket>"; the bucket width is given by
          a first line "# bucket_ms N" (default 10); empty buckets may be
          left out
  gaps    "<end> <length>": gaps between acknowledged writes (the writer
          logs those over 5 ms)
  events  tab-separated, with a header line naming the columns label, start,
          copy, switch, live, end, paused (ms) and gap (ms); one row per
          migration; "-" or empty for a moment that is not known
  data    tab-separated "<case>\t<ms>", one line per run, cases in the order
          they are to be drawn

Exit status 0 with the picture written; 1 with a message on stderr if the
input is unusable. It never needs more than Debian's python3.
"""

import argparse
import csv
import math
import sys
from xml.sax.saxutils import escape

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
# Moments of a migration: (column, legend text, colour).
MOMENTS = [
    ("start", "destination started", "#777777"),
    ("copy", "copy begins", "#1f77b4"),
    ("switch", "switch", "#d62728"),
    ("live", "running at the destination", "#2ca02c"),
    ("end", "source lets go (moved-out)", "#9467bd"),
]
GAP_COLOUR = "#ff7f0e"
LINE_COLOUR = "#333333"


class Svg:
    """An SVG document built as a list of elements."""

    def __init__(self, width, height):
        self.width, self.height = width, height
        self.parts = []

    def add(self, text):
        self.parts.append(text)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", colour="#000", rotate=None, halo=False):
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        # A halo: a white outline under the letters, readable over lines.
        ha = ' stroke="#ffffff" stroke-width="3" paint-order="stroke"' if halo else ""
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{colour}"{tr}{ha}>{escape(str(s))}</text>'
        )

    def line(self, x1, y1, x2, y2, colour="#000", width=1, dash=None, opacity=1):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        o = f' stroke-opacity="{opacity}"' if opacity != 1 else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{colour}" stroke-width="{width}"{d}{o}/>'
        )

    def rect(self, x, y, w, h, fill="none", stroke="none", opacity=1, width=1):
        self.add(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
            f'fill="{fill}" fill-opacity="{opacity}" stroke="{stroke}" stroke-width="{width}"/>'
        )

    def circle(self, x, y, r, fill, opacity=1):
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" fill-opacity="{opacity}"/>')

    def path(self, d, stroke="none", fill="none", width=1, opacity=1):
        self.add(
            f'<path d="{d}" stroke="{stroke}" fill="{fill}" fill-opacity="{opacity}" '
            f'stroke-width="{width}" stroke-linejoin="round"/>'
        )

    def write(self, path):
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" font-family="{FONT}">'
        )
        body = "\n".join([head, f'<rect width="100%" height="100%" fill="#ffffff"/>'] + self.parts + ["</svg>"])
        with open(path, "w", encoding="utf-8") as f:
            f.write('<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n")


def nice_ticks(lo, hi, target=6):
    """Round tick values covering [lo, hi], about `target` of them."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def log_ticks(lo, hi):
    """1, 2, 5 x 10^k ticks within [lo, hi]."""
    ticks = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** k
            if lo <= v <= hi:
                ticks.append(v)
    return ticks


def fmt(v):
    """A tick label: no trailing zeros."""
    if abs(v - round(v)) < 1e-9:
        return f"{int(round(v)):,}".replace(",", "\u2009")
    return f"{v:g}"


def number(s):
    s = (s or "").strip()
    if s in ("", "-", "?"):
        return None
    try:
        return float(s)
    except ValueError:
        return None


def data_lines(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                yield line.rstrip("\n")


# --- timeline ----------------------------------------------------------------------


def read_acks(path):
    bucket = 10
    counts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            p = line.split()
            if len(p) == 3 and p[0] == "#" and p[1] == "bucket_ms":
                bucket = int(p[2])
            elif len(p) == 2 and not line.startswith("#"):
                counts[int(p[0])] = counts.get(int(p[0]), 0) + int(p[1])
    return bucket, counts


def read_gaps(path):
    gaps = []
    if path:
        for line in data_lines(path):
            p = line.split()
            if len(p) == 2:
                gaps.append((float(p[0]) - float(p[1]), float(p[0])))
    return gaps


def read_events(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader((l for l in f if not l.startswith("#")), delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no migrations")
    return rows


def rates(counts, bucket, t0, t1, bin_ms):
    """(bin start, acked writes per second) for bins of bin_ms over [t0, t1)."""
    out = []
    b = t0
    while b < t1:
        n = 0
        k = b - b % bucket
        while k < b + bin_ms:
            n += counts.get(k, 0)
            k += bucket
        out.append((b, n * 1000.0 / bin_ms))
        b += bin_ms
    return out


def timeline_panel(svg, box, counts, bucket, gaps, ev, t0, t1, origin, unit, ymax):
    """One panel: x from t0 to t1 (epoch ms), labelled relative to `origin` in
    `unit` ("s" or "ms")."""
    x, y, w, h = box
    scale = 1000.0 if unit == "s" else 1.0
    sx = lambda t: x + (t - t0) / (t1 - t0) * w
    sy = lambda v: y + h - v / ymax * h
    # Bins of about two pixels, a whole number of buckets.
    bin_ms = max(bucket, int(math.ceil((t1 - t0) / (w / 2) / bucket)) * bucket)
    # The migration's phases, shaded.
    paused, switch, live = number(ev.get("paused")), number(ev.get("switch")), number(ev.get("live"))
    if switch is not None and paused:
        a, b = max(switch - paused, t0), min(switch, t1)
        if b > a:
            svg.rect(sx(a), y, sx(b) - sx(a), h, fill="#d62728", opacity=0.12)
    if switch is not None and live is not None:
        a, b = max(switch, t0), min(live, t1)
        if b > a:
            svg.rect(sx(a), y, sx(b) - sx(a), h, fill="#2ca02c", opacity=0.15)
    # Axes and grid.
    svg.rect(x, y, w, h, stroke="#999999")
    for v in nice_ticks(0, ymax, 4):
        if v <= ymax:
            svg.line(x, sy(v), x + w, sy(v), colour="#e5e5e5")
            svg.line(x - 4, sy(v), x, sy(v), colour="#000")
            svg.text(x - 6, sy(v) + 4, fmt(v), size=11, anchor="end")
    for v in nice_ticks((t0 - origin) / scale, (t1 - origin) / scale, 6 if w > 400 else 4):
        tx = sx(origin + v * scale)
        if x - 0.5 <= tx <= x + w + 0.5:
            svg.line(tx, y + h, tx, y + h + 4, colour="#000")
            svg.text(tx, y + h + 16, fmt(v), size=11, anchor="middle")
    # The acknowledged writes, as a filled step curve.
    pts = rates(counts, bucket, t0, t1, bin_ms)
    d = [f"M{sx(t0):.1f},{sy(0):.1f}"]
    for b, v in pts:
        yv = sy(min(v, ymax))
        d.append(f"L{sx(b):.1f},{yv:.1f}L{sx(min(b + bin_ms, t1)):.1f},{yv:.1f}")
    d.append(f"L{sx(t1):.1f},{sy(0):.1f}Z")
    svg.path("".join(d), stroke=LINE_COLOUR, fill="#4c72b0", width=0.8, opacity=0.35)
    # The longest gap in the panel, as a bar under the curve.
    inside = [g for g in gaps if g[1] > t0 and g[0] < t1]
    if inside:
        g0, g1 = max(inside, key=lambda g: g[1] - g[0])
        a, b = max(g0, t0), min(g1, t1)
        svg.rect(sx(a), y + h - 8, max(sx(b) - sx(a), 2), 8, fill=GAP_COLOUR)
        label = f"longest gap {g1 - g0:.0f} ms"
        lx = min(max(sx(a), x + 4), x + w - 4)
        anchor = "start" if lx < x + w * 0.6 else "end"
        svg.text(lx if anchor == "start" else min(sx(b), x + w - 4), y + h - 12, label, size=11,
                 anchor=anchor, colour="#b35900", weight="bold", halo=True)
    # The moments, as vertical lines.
    for key, _, colour in MOMENTS:
        t = number(ev.get(key))
        if t is not None and t0 <= t <= t1:
            svg.line(sx(t), y, sx(t), y + h, colour=colour, width=1.6 if key == "switch" else 1.2,
                     dash=None if key == "switch" else "5,3")
    return bin_ms


def legend(svg, x, y, items):
    """items: (kind, colour, text) with kind line, dash, box or gap."""
    for kind, colour, text in items:
        if kind == "box":
            svg.rect(x, y - 9, 18, 10, fill=colour, opacity=0.3)
        elif kind == "gap":
            svg.rect(x, y - 7, 18, 6, fill=colour)
        else:
            svg.line(x, y - 4, x + 18, y - 4, colour=colour, width=2, dash=None if kind == "line" else "5,3")
        svg.text(x + 23, y, text, size=11)
        x += 23 + 6.3 * len(text) + 18
    return x


def timeline(args):
    bucket, counts = read_acks(args.acks)
    if not counts:
        raise ValueError(f"{args.acks}: no acknowledged writes")
    gaps = read_gaps(args.gaps)
    events = read_events(args.events)
    width, left, right_w, gutter, row_h, top = 1100, 70, 330, 70, 250, 92
    full_w = width - left - gutter - right_w - 20
    svg = Svg(width, top + row_h * len(events) + 10)
    svg.text(left, 26, args.title, size=16, weight="bold")
    svg.text(left, 46, "A client writes one key after another (SET key:N N) and moves to the next peer when "
             "its connection fails; acknowledged writes per second over time.", size=12, colour="#444")
    items = [("dash" if k != "switch" else "line", c, t) for k, t, c in MOMENTS]
    lx = legend(svg, left, 70, items[:3])
    lx = legend(svg, lx, 70, items[3:])
    legend(svg, left, 86, [("box", "#d62728", "source paused (engine's figure)"),
                           ("box", "#2ca02c", "switch to running at the destination"),
                           ("gap", GAP_COLOUR, "longest gap between acknowledged writes")])
    for i, ev in enumerate(events):
        y = top + i * row_h + 30
        h = row_h - 80
        start, end = number(ev.get("start")), number(ev.get("end"))
        first, last = min(counts), max(counts) + bucket
        since = "s since the destination peer started"
        if start is None:
            start, since = first, "s since the first acknowledged write"
        if end is None:
            end = number(ev.get("live")) or last
        t0, t1 = max(start - 1000, first), min(end + 1500, last)
        if t1 <= t0:
            t0, t1 = first, last
        # The close-up: around the switch (or the longest gap), wide enough
        # for the longest gap when it is near.
        sw = number(ev.get("switch"))
        live = number(ev.get("live"))
        about = "the switch"
        near = [g for g in gaps if g[1] > t0 and g[0] < t1]
        longest = max(near, key=lambda g: g[1] - g[0]) if near else None
        if sw is None:
            sw, about = (longest[0], "the longest gap") if longest else ((t0 + t1) / 2, "the middle")
        z0, z1 = sw - 300, max(sw, live or sw) + 300
        if longest and abs(longest[0] - sw) < 1500:
            z0, z1 = min(z0, longest[0] - 100), max(z1, longest[1] + 100)
        if z1 - z0 < 600:
            z0, z1 = z0 - (600 - (z1 - z0)) / 2, z1 + (600 - (z1 - z0)) / 2
        z0, z1 = max(z0, t0), min(z1, t1)
        peak = max(v for _, v in rates(counts, bucket, t0, t1, 100)) or 1
        ymax = nice_ticks(0, peak * 1.25, 4)[-1]
        if ymax < peak * 1.15:
            ymax = peak * 1.25
        gap = number(ev.get("gap"))
        head = ev.get("label") or f"migration {i + 1}"
        if gap is not None:
            head += f": client-seen downtime {gap:.0f} ms"
        svg.text(left, y - 10, head, size=13, weight="bold")
        b = timeline_panel(svg, (left, y, full_w, h), counts, bucket, gaps, ev, t0, t1, start, "s", ymax)
        svg.text(left + full_w / 2, y + h + 34, f"{since} (bins of {b} ms)",
                 size=12, anchor="middle")
        svg.text(left - 48, y + h / 2, "acked writes/s", size=12, anchor="middle", rotate=-90)
        zx = left + full_w + gutter
        svg.text(zx, y - 10, f"{about} up close", size=12, colour="#444")
        b = timeline_panel(svg, (zx, y, right_w, h), counts, bucket, gaps, ev, z0, z1, sw,
                           "ms", ymax)
        svg.text(zx + right_w / 2, y + h + 34, f"ms from {about} (bins of {b} ms)", size=12, anchor="middle")
    svg.write(args.out)


# --- spread ------------------------------------------------------------------------


def quantile(sorted_vals, q):
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def spread(args):
    cases = {}
    for line in data_lines(args.data):
        p = line.split("\t")
        v = number(p[1]) if len(p) == 2 else None
        if v is None or v <= 0:
            raise ValueError(f"{args.data}: not '<case>\\t<ms>': {line!r}")
        cases.setdefault(p[0], []).append(v)
    if not cases:
        raise ValueError(f"{args.data}: no runs")
    marks = []
    for m in args.mark or []:
        label, _, v = m.rpartition("=")
        if number(v) is not None and number(v) > 0:
            marks.append((label, number(v)))
    allv = [v for vs in cases.values() for v in vs] + [v for _, v in marks]
    lo, hi = min(allv), max(allv)
    log = hi / lo > 10
    if log:
        x0 = 10 ** (math.floor(math.log10(lo) * 4) / 4)
        x1 = 10 ** (math.ceil(math.log10(hi) * 4) / 4)
        ticks = log_ticks(x0, x1)
    else:
        ticks = nice_ticks(0, hi * 1.05, 6)
        x0, x1 = 0, ticks[-1]
    label_w, left, width, row_h, top = 260, 20, 1000, 44, 74
    px0, px1 = left + label_w, width - 170
    h = row_h * len(cases)
    svg = Svg(width, top + h + 50)
    svg.text(left, 26, args.title, size=16, weight="bold")
    svg.text(left, 46, "Every run: a dot each; box from the first to the third quartile, the thick bar is "
             "the median.", size=12, colour="#444")

    def sx(v):
        if log:
            return px0 + (math.log10(v) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * (px1 - px0)
        return px0 + (v - x0) / (x1 - x0) * (px1 - px0)

    svg.rect(px0, top, px1 - px0, h, stroke="#999999")
    for t in ticks:
        svg.line(sx(t), top, sx(t), top + h, colour="#e5e5e5")
        svg.line(sx(t), top + h, sx(t), top + h + 4)
        svg.text(sx(t), top + h + 17, fmt(t), size=11, anchor="middle")
    unit = "ms, log scale" if log else "ms"
    svg.text((px0 + px1) / 2, top + h + 38, f"time to the first served PING or ferry's own figure ({unit})",
             size=12, anchor="middle")
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    for i, (name, vals) in enumerate(cases.items()):
        cy = top + i * row_h + row_h / 2
        if i:
            svg.line(px0, top + i * row_h, px1, top + i * row_h, colour="#f0f0f0")
        colour = palette[i % len(palette)]
        svg.text(px0 - 10, cy + 4, name, size=12, anchor="end")
        s = sorted(vals)
        q1, med, q3 = quantile(s, 0.25), quantile(s, 0.5), quantile(s, 0.75)
        if len(s) > 1:
            svg.line(sx(s[0]), cy, sx(s[-1]), cy, colour=colour, width=1)
            svg.rect(sx(q1), cy - 10, max(sx(q3) - sx(q1), 1), 20, fill=colour, stroke=colour, opacity=0.15)
        svg.line(sx(med), cy - 13, sx(med), cy + 13, colour=colour, width=3)
        for j, v in enumerate(vals):
            jitter = ((j * 7) % 5 - 2) * 3 if len(vals) > 1 else 0
            svg.circle(sx(v), cy + jitter, 3.5, colour, opacity=0.8)
        txt = f"median {fmt(round(med))} ms, n={len(s)}" if len(s) > 1 else f"{fmt(round(med))} ms (one figure)"
        svg.text(px1 + 8, cy + 4, txt, size=11)
    for j, (label, v) in enumerate(marks):
        svg.line(sx(v), top - 4, sx(v), top + h, colour="#d62728", width=1.5, dash="6,4")
        svg.text(sx(v), top - 8 - 12 * (j % 2), label, size=11, anchor="middle", colour="#d62728")
    svg.write(args.out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("timeline", help="bench/migrate: a client's writes over each migration")
    t.add_argument("--acks", required=True)
    t.add_argument("--gaps")
    t.add_argument("--events", required=True)
    t.add_argument("--title", required=True)
    t.add_argument("--out", required=True)
    s = sub.add_parser("spread", help="bench/resume: every run's time per case")
    s.add_argument("--data", required=True)
    s.add_argument("--title", required=True)
    s.add_argument("--mark", action="append", help="LABEL=MS: a dashed reference line")
    s.add_argument("--out", required=True)
    args = p.parse_args()
    try:
        (timeline if args.what == "timeline" else spread)(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
