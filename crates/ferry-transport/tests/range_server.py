"""A plain static file server with single-range support, for ferry-transport's
tests: Python's own http.server ignores Range headers (CPython issue 86809),
but a package can be served by any static server that honours them; this is
one that is not ferry.

Usage: range_server.py DIR [--throttle SECONDS]
Prints the port it listens on (127.0.0.1, a free port), then serves DIR.
--throttle sleeps after every 64 KiB sent, so a test can kill the server in
the middle of a transfer.
"""

import argparse
import functools
import http.server
import os
import re
import time


class Handler(http.server.SimpleHTTPRequestHandler):
    throttle = 0.0

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404)
            return None
        size = os.fstat(f.fileno()).st_size
        first, last, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if m and (m.group(1) or m.group(2)):
            a, b = m.group(1), m.group(2)
            if a == "":
                n = int(b)
                first, last = max(size - n, 0), size - 1
                bad = n == 0 or size == 0
            else:
                first = int(a)
                last = min(int(b), size - 1) if b else size - 1
                bad = first >= size
            if bad:
                f.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if first <= last:
                status = 206
            else:
                first, last = 0, size - 1
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        f.seek(first)
        self.remaining = last - first + 1
        return f

    def copyfile(self, source, outputfile):
        left = self.remaining
        while left > 0:
            buf = source.read(min(65536, left))
            if not buf:
                break
            outputfile.write(buf)
            left -= len(buf)
            if self.throttle:
                outputfile.flush()
                time.sleep(self.throttle)

    def log_message(self, *args):
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--throttle", type=float, default=0.0)
    args = p.parse_args()
    Handler.throttle = args.throttle
    handler = functools.partial(Handler, directory=args.dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
