"""Loopback fake of the Hugging Face Hub for the real ``huggingface_hub`` client (docs/hub.md §6).

Stdlib only: a ``ThreadingHTTPServer`` on 127.0.0.1, HTTP/1.1 keep-alive, ``Content-Length`` on
every response. Model repos only. Not covered: Xet transfers, CDN redirects, pagination, rate
limits, token scopes, LFS multipart uploads, tags.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from urllib.parse import unquote

from support.fake_hub_wire import (EMPTY_COMMIT, HubError, Request, _Fault, _Handler, _json,
                                  _RANGE_RE, _Server, _SHA_RE, blob_oid, etag_of, is_lfs,
                                  lfs_oid, lfs_pointer)


class FakeHub:
    """State (``repos``, ``lfs``), request ``log`` and one-shot faults of one fake Hub server."""

    TOKEN = "hf_fake_token"

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[Request] = []
        self.valid_tokens: set[str] = {self.TOKEN}
        self.server_errors: list[str] = []  # tracebacks of bugs in the fake itself
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state helpers for tests -------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                 gated: bool = False, branch: str = "main") -> str:
        """Create the repo if needed, set its flags, commit ``files`` on ``branch``; the sha."""
        with self._lock:
            repo = self._ensure_repo(repo_id)
            repo["private"], repo["gated"] = private, gated
            return self.commit_files(repo_id, files, branch=branch)

    def commit_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main",
                     delete=()) -> str:
        """New commit on ``branch`` (created from ``main`` if missing): head + files - delete."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo["branches"].get(branch) or repo["branches"]["main"]
            new = dict(repo["commits"][parent])
            for path in delete:
                new.pop(path, None)
            for path, data in files.items():
                new[path] = bytes(data)
                if is_lfs(path):
                    self.lfs[lfs_oid(new[path])] = new[path]
            return self._commit(repo, branch, parent, new)

    def files_at(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo["commits"][self._rev(repo, rev)])

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id]["branches"][branch]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def fail_next(self, path_substring: str, *, status: int | None = None,
                  truncate: bool | int = False, delay: float = 0.0, method: str | None = None,
                  times: int = 1, full_only: bool = False, consistent: bool = False) -> None:
        """Arm a fault for the next ``times`` requests whose decoded path contains
        ``path_substring`` (and whose method is ``method``, if given; ``full_only``: only requests
        without a Range header). ``delay``: sleep first. ``status``: answer it, with
        ``X-Error-Code: InjectedFault``. ``truncate``: send the full Content-Length but only half
        the body (True) or that many bytes (an int), then close the connection; never matches
        HEAD. ``consistent=True``: send the cut body with a matching Content-Length (HEAD too)
        and keep the connection, so the client cannot tell."""
        with self._lock:
            self._faults.append(_Fault(path_substring, method, status, truncate, delay, times,
                                       full_only, consistent))

    # ---- internals: state ----------------------------------------------------------------------
    def _ensure_repo(self, repo_id: str) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None:
            repo = self.repos[repo_id] = {"private": False, "gated": False,
                                          "branches": {"main": EMPTY_COMMIT},
                                          "commits": {EMPTY_COMMIT: {}}}
        return repo

    def _commit(self, repo: dict, branch: str, parent: str, files: dict[str, bytes]) -> str:
        self._counter += 1
        h = hashlib.sha1(f"{parent}\n{self._counter}\n".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + blob_oid(files[path]).encode())
        sha = h.hexdigest()
        repo["commits"][sha] = files
        repo["branches"][branch] = sha
        return sha

    def _take_fault(self, method: str, path: str, rng: str | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.substring in path and fault.method in (None, method)
                        and not (fault.full_only and rng)
                        and not (method == "HEAD" and fault.cuts and not fault.consistent)):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _token_ok(self, auth: str | None) -> bool:
        return bool(auth) and auth.startswith("Bearer ") and auth[7:].strip() in self.valid_tokens

    def _repo(self, repo_id: str, token_ok: bool) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not token_ok):
            raise HubError(401 if repo else 404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo["gated"] and not token_ok:
            raise HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are "
                           "not in the authorized list.")
        return repo

    def _write_repo(self, repo_id: str, token_ok: bool) -> dict:
        repo = self._repo(repo_id, token_ok)
        if not token_ok:
            raise HubError(401, "Unauthorized", "Invalid username or password.")
        return repo

    @staticmethod
    def _rev(repo: dict, rev: str) -> str:
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if _SHA_RE.fullmatch(rev) and rev in repo["commits"]:
            return rev
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    # ---- internals: routing ------------------------------------------------------------------
    def _route(self, method: str, raw_path: str, query: dict, body: bytes, headers) -> tuple:
        segs = [unquote(s) for s in raw_path.split("/")[1:]]  # split first, then decode
        tok = self._token_ok(headers.get("Authorization"))
        is_api = segs[:2] == ["api", "models"] and len(segs) >= 4
        api_repo = f"{segs[2]}/{segs[3]}" if is_api else None
        rest = segs[4:]
        if method in ("GET", "HEAD"):
            if api_repo and not rest:
                return self._info(api_repo, "main", query, tok)
            if api_repo and rest[0] == "revision" and len(rest) >= 2:
                return self._info(api_repo, "/".join(rest[1:]), query, tok)
            if api_repo and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(api_repo, rest[1], "/".join(rest[2:]), query, tok)
            if len(segs) >= 5 and segs[2] == "resolve":
                return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]),
                                     headers.get("Range"), tok)
        elif method == "POST":
            if segs == ["api", "repos", "create"]:
                return self._create(json.loads(body or b"{}"), tok)
            if segs == ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            if api_repo and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(api_repo, rest[1], json.loads(body), tok)
            if api_repo and len(rest) == 2 and rest[0] == "commit":
                return self._commit_api(api_repo, rest[1], query, body, tok)
            if (len(segs) == 6 and segs[1].endswith(".git")
                    and segs[2:] == ["info", "lfs", "objects", "batch"]):
                return self._lfs_batch(f"{segs[0]}/{segs[1][:-4]}", json.loads(body), tok)
        elif method == "PUT" and len(segs) == 2 and segs[0] == "_lfs":
            return self._lfs_put(segs[1], body)
        raise HubError(404, "RouteNotFound", f"fake hub has no route for {method} {raw_path}")

    # ---- endpoints ---------------------------------------------------------------------------
    def _info(self, repo_id: str, rev: str, query: dict, tok: bool) -> tuple:
        """#1 GET /api/models/{repo}[/revision/{rev}]."""
        with self._lock:
            repo = self._repo(repo_id, tok)
            sha = self._rev(repo, rev)
            files = repo["commits"][sha]
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            data = files[path]
            sib = {"rfilename": path, "size": len(data)}
            if blobs:
                sib["blobId"] = blob_oid(lfs_pointer(data) if is_lfs(path) else data)
                if is_lfs(path):
                    sib["lfs"] = {"sha256": lfs_oid(data), "size": len(data),
                                  "pointerSize": len(lfs_pointer(data))}
            siblings.append(sib)
        return _json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                      "gated": "auto" if repo["gated"] else False, "siblings": siblings})

    def _tree(self, repo_id: str, rev: str, path: str, query: dict, tok: bool) -> tuple:
        """#2 GET /api/models/{repo}/tree/{rev}[/{path}]: files and folders, no pagination."""
        with self._lock:
            repo = self._repo(repo_id, tok)
            sha = self._rev(repo, rev)
            files = repo["commits"][sha]
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}",
                           {"X-Repo-Commit": sha})
        dirs: set[str] = set()
        entries = []
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                data = files[p]
                entry = {"type": "file", "path": p, "size": len(data),
                         "oid": blob_oid(lfs_pointer(data) if is_lfs(p) else data)}
                if is_lfs(p):
                    entry["lfs"] = {"oid": lfs_oid(data), "size": len(data),
                                    "pointerSize": len(lfs_pointer(data))}
                entries.append(entry)
        folders = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
                   for d in sorted(dirs)]
        return _json(folders + entries)

    def _resolve(self, repo_id: str, rev: str, path: str, rng: str | None, tok: bool) -> tuple:
        """#3/#4 HEAD/GET /{repo}/resolve/{rev}/{path}, with single-range support."""
        with self._lock:
            repo = self._repo(repo_id, tok)
            sha = self._rev(repo, rev)
            data = repo["commits"][sha].get(path)
        if data is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"",
                           {"X-Repo-Commit": sha})
        headers = {"ETag": f'"{etag_of(path, data)}"', "X-Repo-Commit": sha,
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        total = len(data)
        m = _RANGE_RE.fullmatch(rng) if rng else None
        if m and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else total - 1, total - 1)
            else:
                start, end = max(total - int(m[2]), 0), total - 1
            if start >= total or start > end:
                raise HubError(416, "RangeNotSatisfiable", f"range {rng} outside 0-{total}",
                               {"Content-Range": f"bytes */{total}", "X-Repo-Commit": sha})
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            return 206, data[start:end + 1], headers
        return 200, data, headers

    def _create(self, payload: dict, tok: bool) -> tuple:
        """#5 POST /api/repos/create; 409 (still with "url") if it exists."""
        if not tok:
            raise HubError(401, "Unauthorized", "Invalid username or password.")
        org, name = payload.get("organization"), payload["name"]
        repo_id = f"{org}/{name}" if org else name
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "RepoExists", "You already created this model repo",
                               extra={"url": url})
            repo = self._ensure_repo(repo_id)
            repo["private"] = (payload.get("visibility") == "private"
                               or payload.get("private") is True)
        return _json({"url": url, "name": repo_id})

    def _preupload(self, repo_id: str, rev: str, payload: dict, tok: bool) -> tuple:
        """#7 POST /api/models/{repo}/preupload/{rev}: upload mode + oid at the head."""
        with self._lock:
            repo = self._write_repo(repo_id, tok)
            files = repo["commits"][self._rev(repo, rev)]
        out = []
        for item in payload["files"]:
            path = item["path"]
            entry = {"path": path, "uploadMode": "lfs" if is_lfs(path) else "regular",
                     "shouldIgnore": False}
            if path in files:
                entry["oid"] = lfs_oid(files[path]) if is_lfs(path) else blob_oid(files[path])
            out.append(entry)
        return _json({"files": out})

    def _lfs_batch(self, repo_id: str, payload: dict, tok: bool) -> tuple:
        """#8 POST /{repo}.git/info/lfs/objects/batch: upload hrefs for unknown objects."""
        with self._lock:
            self._write_repo(repo_id, tok)
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"}}
                objects.append(entry)
        return _json({"transfer": "basic", "objects": objects},
                     ctype="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> tuple:
        """#9 PUT /_lfs/{oid}: 400 unless sha256(body) == oid."""
        if lfs_oid(body) != oid:
            raise HubError(400, "BadRequest", f"sha256 of the body does not match {oid}")
        with self._lock:
            self.lfs[oid] = body
        return 200, b"", {}

    def _commit_api(self, repo_id: str, rev: str, query: dict, body: bytes, tok: bool) -> tuple:
        """#10 POST /api/models/{repo}/commit/{rev} (ndjson); ``?create_pr=1`` opens refs/pr/N."""
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "BadRequest", "commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:
            repo = self._write_repo(repo_id, tok)
            if rev not in repo["branches"]:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            base = repo["branches"][rev]
            parent = header.get("parentCommit")
            if parent and not base.startswith(parent):
                raise HubError(412, "PreconditionFailed", f"parent commit {parent} is not the head")
            files = dict(repo["commits"][base])
            for item in lines[1:]:
                key, value = item.get("key"), item.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    files[path] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    data = self.lfs.get(value["oid"])
                    if data is None or ("size" in value and value["size"] != len(data)):
                        raise HubError(400, "BadRequest", f"LFS object {value['oid']} not uploaded")
                    files[path] = data
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", f"{path} does not exist",
                                       {"X-Repo-Commit": base})
                elif key == "deletedFolder":
                    gone = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not gone:
                        raise HubError(404, "EntryNotFound", f"folder {path} does not exist",
                                       {"X-Repo-Commit": base})
                    for p in gone:
                        del files[p]
                else:
                    raise HubError(400, "BadRequest", f"unknown commit operation {key!r}")
            branch, answer = rev, {}
            if query.get("create_pr", "").lower() in ("1", "true"):
                num = 1 + sum(b.startswith("refs/pr/") for b in repo["branches"])
                branch = f"refs/pr/{num}"
                answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{num}"
            sha = self._commit(repo, branch, base, files)
        answer.update(commitUrl=f"{self.url}/{repo_id}/commit/{sha}", commitOid=sha)
        return _json(answer)


