"""A stand-in for the Hugging Face hub's file endpoints on 127.0.0.1, for download tests.

Serves HEAD/GET /{repo}/resolve/{revision}/{path} like the hub does for LFS files (ETag = sha256,
X-Repo-Commit, Content-Length, Range requests), and can be told to answer a path with 404, 500, or a
body cut short (the headers announce the full size, the connection closes early).
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.files: dict[str, bytes] = {}
        # repo path -> "404" | "500" | "truncate" (every GET stops halfway) | "drop_once" (the first GET
        # stops halfway, later ones serve normally) | "short" (a consistent response for half the file)
        self.faults: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _path(self) -> str | None:
                prefix = f"/{hub.repo_id}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                rest = self.path[len(prefix):].split("?")[0]
                return rest.split("/", 1)[1] if "/" in rest else None

            def _answer(self, with_body: bool) -> None:
                path = self._path()
                hub.requests.append((self.command, path or self.path, self.headers.get("Range")))
                fault = hub.faults.get(path or "")
                if fault == "truncate_now":
                    fault = None
                if path is None or path not in hub.files or fault == "404":
                    self._plain(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
                    return
                if fault == "500":
                    self._plain(500, b"Internal Error", {})
                    return
                data = hub.files[path]
                full_size = len(data)
                if fault == "short":
                    data = data[: len(data) // 2]
                if fault == "drop_once" and with_body:
                    hub.faults[path] = "truncate_now"
                    fault = "truncate"
                digest = hashlib.sha256(hub.files[path]).hexdigest()
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", f'"{digest}"')
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(full_size))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                if fault == "truncate" and with_body:
                    self.send_header("Connection", "close")
                self.end_headers()
                if with_body:
                    if fault == "truncate":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                    else:
                        self.wfile.write(body)

            def _plain(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self._answer(with_body=False)

            def do_GET(self):
                self._answer(with_body=True)

        return Handler
