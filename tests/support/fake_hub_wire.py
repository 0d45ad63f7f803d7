"""Wire side of the fake Hub (tests/fake_hub.py): oids, request records, faults, the HTTP server.

Stdlib only: a ``ThreadingHTTPServer`` on 127.0.0.1, HTTP/1.1 keep-alive, ``Content-Length`` on
every response.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    from support.fake_hub import FakeHub

EMPTY_COMMIT = "0" * 40
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
_JSON = "application/json"


def blob_oid(data: bytes) -> str:
    """Git blob sha1: sha1(b"blob {len}\\0" + data)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_oid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def etag_of(path: str, data: bytes) -> str:
    """Unquoted ETag the fake sends for a file: the LFS oid for LFS files, else the blob oid."""
    return lfs_oid(data) if is_lfs(path) else blob_oid(data)


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs_oid(data)}\n"
            f"size {len(data)}\n").encode()


@dataclass
class Request:
    """One logged request. ``path`` is percent-decoded, ``raw_path`` as sent; ``status`` is what
    the fake answered (None until answered)."""
    method: str
    path: str
    raw_path: str
    query: dict
    range: str | None
    auth: bool
    host: str
    status: int | None = None


@dataclass
class _Fault:
    substring: str
    method: str | None
    status: int | None
    truncate: bool | int
    delay: float
    times: int
    full_only: bool
    consistent: bool

    @property
    def cuts(self) -> bool:
        return self.truncate is not False and self.truncate is not None


class HubError(Exception):
    """An error answer: status, ``X-Error-Code``, message, extra headers and extra body fields."""

    def __init__(self, status: int, code: str, msg: str, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg
        self.headers, self.extra = headers or {}, extra or {}


def _json(obj, status: int = 200, ctype: str = _JSON):
    return status, json.dumps(obj).encode(), {"Content-Type": ctype}


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that ``stop()`` can end idle keep-alive ones."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 30  # idle keep-alive connections end after this
    disable_nagle_algorithm = True  # else ~40 ms per request (Nagle + delayed ACK)
    hub: FakeHub

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.hub
        body = self._read_body()  # always drain, so keep-alive stays in sync
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        rec = Request(self.command, unquote(split.path), split.path, query,
                      self.headers.get("Range"), self.headers.get("Authorization") is not None,
                      self.headers.get("Host", ""))
        with hub._lock:
            hub.log.append(rec)
        fault = hub._take_fault(self.command, rec.path, rec.range)
        if fault and fault.delay:
            time.sleep(fault.delay)
        try:
            if fault and fault.status:
                raise HubError(fault.status, "InjectedFault", f"injected fault {fault.status}")
            status, payload, headers = hub._route(self.command, split.path, rec.query, body,
                                                  self.headers)
        except HubError as e:
            status = e.status
            payload = json.dumps({"error": e.msg, **e.extra}).encode()
            headers = {"Content-Type": _JSON, "X-Error-Code": e.code,
                       "X-Error-Message": e.msg.encode("ascii", "backslashreplace").decode(),
                       **e.headers}
        except Exception:  # a bug in the fake: answer 500 and keep the traceback for the guard
            tb = traceback.format_exc()
            hub.server_errors.append(tb)
            print(tb, file=sys.stderr)
            status, payload = 500, json.dumps({"error": "fake hub bug"}).encode()
            headers = {"Content-Type": _JSON, "X-Error-Code": "FakeHubBug"}
        self._send(rec, status, payload, headers, fault)

    def _send(self, rec: Request, status: int, payload: bytes, headers: dict,
              fault: _Fault | None) -> None:
        cut = None
        if fault is not None and fault.cuts:
            cut = len(payload) // 2 if fault.truncate is True else int(fault.truncate)
            cut = min(cut, max(len(payload) - 1, 0))
            if fault.consistent:
                payload, cut = payload[:cut], None
        rec.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(payload)))  # HEAD: the full GET size
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True  # short body, then EOF
            return
        self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle
