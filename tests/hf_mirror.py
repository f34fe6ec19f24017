"""A local stand-in for the Hugging Face hub's file endpoint, with faults on demand.

It answers as the hub does for a file stored with LFS/Xet: HEAD or GET
{endpoint}/datasets/{repo}/resolve/{revision}/{name} is a 302 to a CDN on another origin, and that
redirect carries X-Repo-Commit, X-Linked-Etag (the file's sha256, its LFS object id, quoted) and
X-Linked-Size; the CDN honours Range. huggingface_hub reads the same headers (get_hf_file_metadata),
so HF_ENDPOINT=mirror.endpoint works for it too. With a token set, the hub answers 401 without
`Authorization: Bearer <token>`; the CDN never needs it (and records whether it got it).

Faults, by file name: mirror.faults[name] is a list consumed one per request for that file's body
(mirror.sticky[name] applies to every request):
    "404", "500"   the hub answers with that status
    "wrongsha"     the hub publishes a sha256 that is not the file's
    "slow"         the body comes at mirror.rate bytes/s
    "reset"        half the body, then the connection is reset (RST)
    "close"        half the body, then a clean close (FIN) short of Content-Length
    "norange"      Range is ignored: 200 and the whole body
    "truncated"    a complete response of the file less its last 1000 bytes
    "corrupt"      the whole file with one byte flipped in the middle

Used by tests/test_prepare.py and tests/bench_download.py; real HTTP on 127.0.0.1 only.
"""

import hashlib
import http.server
import socket
import struct
import threading
import time

REPO = "karpathy/climbmix-400b-shuffle"
HUB_FAULTS = ("404", "500", "wrongsha")
CDN_FAULTS = ("slow", "reset", "close", "norange", "truncated", "corrupt")
COMMIT = "6a1b2c3d4e5f60718293a4b5c6d7e8f901234567"  # any 40 hex digits: huggingface_hub wants one


class Mirror:
    def __init__(self, files, token=None, rate=200_000):
        self.files = dict(files)  # name -> bytes
        self.sha = {n: hashlib.sha256(b).hexdigest() for n, b in self.files.items()}
        self.token, self.rate = token, rate
        self.faults, self.sticky = {}, {}
        self.log = []  # (method, kind, name, range start, had Authorization)
        self.lock = threading.Lock()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.handle_any(head=True)

            def do_GET(self):
                self.handle_any(head=False)

            def handle_any(self, head):
                try:
                    mirror.serve(self, head)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def handle(self):
                try:
                    super().handle()
                except (OSError, ValueError):  # the socket was torn down on purpose
                    pass

            def finish(self):
                try:
                    super().finish()
                except (OSError, ValueError):  # the socket was torn down on purpose
                    pass

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        for srv in self.servers:  # the hub and its CDN: two origins, as on the real hub
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.endpoint, self.cdn = (f"http://127.0.0.1:{srv.server_port}" for srv in self.servers)
        self.base_url = f"{self.endpoint}/datasets/{REPO}/resolve/main"

    def close(self):
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def requests(self, kind, name):
        return [e for e in self.log if e[1] == kind and e[2] == name]

    def _fault(self, name, kinds):
        """The next queued fault for `name` if it is one of `kinds` (popped), else a sticky one."""
        with self.lock:
            queue = self.faults.get(name)
            if queue and queue[0] in kinds:
                return queue.pop(0)
            return self.sticky.get(name) if self.sticky.get(name) in kinds else None

    def serve(self, h, head):
        path = h.path.split("?")[0]
        start = 0
        if "Range" in h.headers:
            start = int(h.headers["Range"].split("=")[1].split("-")[0])
        auth = "Authorization" in h.headers
        prefix = f"/datasets/{REPO}/resolve/"
        if path.startswith(prefix):  # the hub: metadata and a redirect
            name = path[len(prefix):].split("/", 1)[1]
            self.log.append((h.command, "hub", name, start, auth))
            if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
                return self._status(h, 401)
            if name not in self.files:
                return self._status(h, 404)
            fault = self._fault(name, HUB_FAULTS)
            if fault in ("404", "500"):
                return self._status(h, int(fault))
            sha = self.sha[name]
            if fault == "wrongsha":
                sha = hashlib.sha256(sha.encode()).hexdigest()
            h.send_response(302)
            h.send_header("Location", f"{self.cdn}/cdn/{self.sha[name]}?name={name}")
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(self.files[name])))
            h.send_header("ETag", '"' + hashlib.sha1(name.encode()).hexdigest() + '"')  # the pointer's git sha1
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if path.startswith("/cdn/"):  # the CDN: the bytes, with Range
            name = h.path.split("name=")[-1]
            self.log.append((h.command, "cdn", name, start, auth))
            data = self.files[name]
            fault = self._fault(name, CDN_FAULTS) if not head else None
            if fault == "truncated":
                data = data[:-1000]
            elif fault == "corrupt":
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            if fault == "norange":
                start = 0
            if start >= len(data) and start:
                return self._status(h, 416)
            body = data[start:]
            h.send_response(206 if start else 200)
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Accept-Ranges", "bytes")
            h.send_header("ETag", f'"{self.sha[name]}"')
            h.end_headers()
            if head:
                return
            if fault in ("reset", "close"):
                h.wfile.write(body[:len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                if fault == "reset":
                    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    h.rfile.close()
                    h.wfile.close()
                    h.connection.close()
                else:
                    h.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "slow":
                step = max(1, self.rate // 20)
                for i in range(0, len(body), step):
                    h.wfile.write(body[i:i + step])
                    h.wfile.flush()
                    time.sleep(step / self.rate)
                return
            h.wfile.write(body)
            return
        self._status(h, 404)

    @staticmethod
    def _status(h, code):
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()
