"""The fake Hub (tests/fake_hub.py) against the real huggingface_hub client.

Every call passes ``endpoint=hub.url`` and (where the API takes one) ``cache_dir=tmp_path``.
These tests also pin the client behaviours the project's Hub code relies on.
"""

from __future__ import annotations

import http.client
import json
import time
import types

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx
from safetensors.torch import save

from support.fake_hub import EMPTY_COMMIT, FakeHub, blob_oid, lfs_oid

TOKEN = FakeHub.TOKEN
SHARDS2 = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def st_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    return save(tensors, metadata={"format": "pt", **(metadata or {})})


def sharded_files() -> dict[str, bytes]:
    """config + index + two shards (~256 KiB each); shard 2's header is > 100 000 bytes."""
    s1 = {"a.weight": torch.ones(256, 256), "b.weight": torch.zeros(4, dtype=torch.float16)}
    s2 = {"c.weight": torch.full((256, 256), 2.0)}
    index = {"metadata": {"total_size": 0},
             "weight_map": {**{k: SHARDS2[0] for k in s1}, **{k: SHARDS2[1] for k in s2}}}
    return {"config.json": b'{"model_type": "llama"}',
            "model.safetensors.index.json": json.dumps(index).encode(),
            SHARDS2[0]: st_bytes(s1), SHARDS2[1]: st_bytes(s2, {"pad": "x" * 120_000})}


def no_sleep(monkeypatch) -> list[float]:
    """Make the client's retry sleeps instant; returns the list of requested sleeps."""
    import huggingface_hub.file_download as fd
    import huggingface_hub.utils._http as hh

    slept: list[float] = []
    fake_time = types.SimpleNamespace(sleep=slept.append, time=time.time)
    monkeypatch.setattr(hh, "time", fake_time)
    monkeypatch.setattr(fd, "time", fake_time)
    return slept


def calls(hub, method=None, contains=""):
    return [r for r in hub.log if (method is None or r.method == method) and contains in r.path]


# ---- reading --------------------------------------------------------------------------------

def test_model_info_gives_sha_and_siblings(fake_hub):
    sha = fake_hub.add_repo("org/m", sharded_files())
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    for rev in ("main", sha, None):
        info = api.model_info("org/m", revision=rev)
        assert info.id == "org/m" and info.sha == sha
        assert sorted(s.rfilename for s in info.siblings) == sorted(sharded_files())
    assert [r.path for r in fake_hub.log] == [
        "/api/models/org/m/revision/main", f"/api/models/org/m/revision/{sha}", "/api/models/org/m"]
    assert all(r.auth and r.host.startswith("127.0.0.1:") for r in fake_hub.log)


def test_download_then_cache_hit(fake_hub, tmp_path):
    sha = fake_hub.add_repo("org/m", {"config.json": b'{"x": 1}'})
    kw = dict(cache_dir=tmp_path, endpoint=fake_hub.url, token=TOKEN)
    path = hf_hub_download("org/m", "config.json", revision=sha, **kw)
    assert open(path, "rb").read() == b'{"x": 1}'
    assert [(r.method, r.status) for r in fake_hub.log] == [("HEAD", 200), ("GET", 200)]
    blob = tmp_path / "models--org--m" / "blobs" / blob_oid(b'{"x": 1}')  # ETag names the blob
    assert blob.is_file()
    fake_hub.clear_log()
    assert hf_hub_download("org/m", "config.json", revision=sha, **kw) == path
    assert fake_hub.log == []  # pinned sha + cached file: no request at all
    assert hf_hub_download("org/m", "config.json", revision="main", **kw) == path
    assert [r.method for r in fake_hub.log] == ["HEAD"]  # branch: one HEAD, nothing downloaded


def test_safetensors_metadata_reads_headers_only(fake_hub, tmp_path):
    files = sharded_files()
    sha = fake_hub.add_repo("org/sharded", files)
    meta = HfApi(endpoint=fake_hub.url, token=TOKEN).get_safetensors_metadata(
        "org/sharded", revision=sha)
    assert meta.sharded and meta.weight_map == json.loads(files["model.safetensors.index.json"])[
        "weight_map"]
    t = meta.files_metadata[SHARDS2[0]].tensors
    assert (t["a.weight"].dtype, t["a.weight"].shape) == ("F32", [256, 256])
    assert t["b.weight"].dtype == "F16"
    shard_gets = [r for r in calls(fake_hub, "GET") if r.path.endswith(".safetensors")]
    assert shard_gets and all(r.range and r.status == 206 for r in shard_gets)
    first = [r.range for r in shard_gets if r.path.endswith(SHARDS2[0])]
    second = [r.range for r in shard_gets if r.path.endswith(SHARDS2[1])]
    assert first == ["bytes=0-100000"]
    assert second[0] == "bytes=0-100000" and second[1].startswith("bytes=8-")  # long header
    assert [(r.method, r.status) for r in fake_hub.log if r.path.endswith("/model.safetensors")
            ] == [("HEAD", 404)]  # file_exists("model.safetensors") -> not single-file
    assert [(r.method, r.status) for r in calls(fake_hub, contains=".index.json")] == [
        ("HEAD", 200), ("HEAD", 200), ("GET", 200)]


def test_revision_pinning_by_sha_and_branch(fake_hub, tmp_path):
    sha1 = fake_hub.add_repo("org/m", {"config.json": b"v1"})
    sha2 = fake_hub.commit_files("org/m", {"config.json": b"v2", "extra.txt": b"e"})
    dev = fake_hub.commit_files("org/m", {"config.json": b"dev"}, branch="dev")
    pr = fake_hub.commit_files("org/m", {"config.json": b"pr"}, branch="refs/pr/1")
    assert len({sha1, sha2, dev, pr, EMPTY_COMMIT}) == 5 and fake_hub.head("org/m") == sha2
    assert fake_hub.files_at("org/m", sha1) == {"config.json": b"v1"}
    kw = dict(cache_dir=tmp_path, endpoint=fake_hub.url, token=TOKEN)
    for rev, want in ((sha1, b"v1"), ("main", b"v2"), (sha2, b"v2"), ("dev", b"dev"),
                      ("refs/pr/1", b"pr")):
        path = hf_hub_download("org/m", "config.json", revision=rev, **kw)
        assert open(path, "rb").read() == want
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    assert api.model_info("org/m", revision="refs/pr/1").sha == pr
    assert any("refs%2Fpr%2F1" in r.raw_path for r in fake_hub.log)  # decoded per segment
    assert (tmp_path / "models--org--m" / "refs" / "dev").read_text() == dev  # no newline


def test_list_repo_tree(fake_hub):
    sha = fake_hub.add_repo("org/m", {"config.json": b"{}", "model.safetensors": st_bytes(
        {"w": torch.ones(2)}), "sub/a.txt": b"a", "sub/deep/b.txt": b"b"})
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    top = {e.path: type(e).__name__ for e in api.list_repo_tree("org/m", revision=sha)}
    assert top == {"config.json": "RepoFile", "model.safetensors": "RepoFile", "sub": "RepoFolder"}
    everything = list(api.list_repo_tree("org/m", revision=sha, recursive=True))
    assert {e.path for e in everything} >= {"sub/deep", "sub/deep/b.txt"}
    weights = next(e for e in everything if e.path == "model.safetensors")
    assert weights.lfs.sha256 == lfs_oid(fake_hub.files_at("org/m")["model.safetensors"])
    assert [e.path for e in api.list_repo_tree("org/m", "sub", revision=sha)] == [
        "sub/deep", "sub/a.txt"]
    assert sorted(api.list_repo_files("org/m")) == [
        "config.json", "model.safetensors", "sub/a.txt", "sub/deep/b.txt"]


# ---- errors ---------------------------------------------------------------------------------

def classify(exc: BaseException) -> str:
    """Catch order as the project must use it: GatedRepoError before RepositoryNotFoundError."""
    for cls in (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
                RemoteEntryNotFoundError, HfHubHTTPError):
        if isinstance(exc, cls):
            return cls.__name__
    return type(exc).__name__


def test_error_classes(fake_hub, tmp_path):
    sha = fake_hub.add_repo("org/m", {"config.json": b"{}"})
    fake_hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    fake_hub.add_repo("org/private", {"config.json": b"{}"}, private=True)
    anon = HfApi(endpoint=fake_hub.url, token=False)

    def dl(repo, name="config.json", rev="main", token=False):
        return hf_hub_download(repo, name, revision=rev, cache_dir=tmp_path,
                               endpoint=fake_hub.url, token=token)

    cases = [
        (lambda: anon.model_info("org/absent"), "RepositoryNotFoundError", 404),
        (lambda: dl("org/absent"), "RepositoryNotFoundError", 404),
        (lambda: anon.model_info("org/m", revision="v2"), "RevisionNotFoundError", 404),
        (lambda: dl("org/m", rev="v2"), "RevisionNotFoundError", 404),
        (lambda: dl("org/m", rev="a" * 40), "RevisionNotFoundError", 404),
        (lambda: dl("org/m", "nope.json"), "RemoteEntryNotFoundError", 404),
        (lambda: anon.model_info("org/gated"), "GatedRepoError", 403),
        (lambda: dl("org/gated"), "GatedRepoError", 403),
        (lambda: anon.model_info("org/private"), "RepositoryNotFoundError", 401),
        (lambda: dl("org/private"), "RepositoryNotFoundError", 401),
        (lambda: dl("org/private", token="hf_wrong"), "RepositoryNotFoundError", 401),
    ]
    for call, name, status in cases:
        with pytest.raises(HfHubHTTPError) as info:
            call()
        assert (classify(info.value), info.value.response.status_code) == (name, status)
    assert (tmp_path / "models--org--m" / ".no_exist" / sha / "nope.json").exists()
    assert dl("org/private", token=TOKEN) and dl("org/gated", token=TOKEN)
    assert HfApi(endpoint=fake_hub.url, token=TOKEN).model_info("org/private").sha


# ---- publishing -----------------------------------------------------------------------------

def test_create_repo_twice(fake_hub):
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    first = api.create_repo("org/new", private=True, exist_ok=True)
    second = api.create_repo("org/new", private=True, exist_ok=True)
    assert first == second == f"{fake_hub.url}/org/new" and first.repo_id == "org/new"
    assert [r.status for r in calls(fake_hub, "POST", "/api/repos/create")] == [200, 409]
    assert fake_hub.repos["org/new"]["private"] and fake_hub.head("org/new") == EMPTY_COMMIT
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("org/new")
    assert info.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=fake_hub.url, token=False).create_repo("org/other", exist_ok=True)
    assert info.value.response.status_code == 401


def write_output(folder, shards: int, seed: float) -> list[str]:
    folder.mkdir(exist_ok=True)
    for old in folder.glob("model-*.safetensors"):
        old.unlink()
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    weight_map = {}
    for i, name in enumerate(names):
        (folder / name).write_bytes(st_bytes({f"t{i}": torch.full((8,), seed + i)}))
        weight_map[f"t{i}"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\ntags:\n- merge\n---\n\n# out\n")
    (folder / "notes.txt").write_text("not published")
    return ["config.json", "README.md", "model.safetensors.index.json", *names]


def test_upload_folder_lfs_and_stale_shards(fake_hub, tmp_path):
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    api.create_repo("org/out", exist_ok=True)
    deletes = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
    out = tmp_path / "out"

    def publish(allow):
        return api.upload_folder(repo_id="org/out", folder_path=out, commit_message="m",
                                 allow_patterns=allow, delete_patterns=deletes)

    fake_hub.clear_log()
    first = write_output(out, 2, 1.0)
    info = publish(first)
    assert info.oid == fake_hub.head("org/out") and info.commit_url.endswith(info.oid)
    assert sorted(fake_hub.files_at("org/out")) == sorted(first)
    assert fake_hub.files_at("org/out")[first[-1]] == (out / first[-1]).read_bytes()
    assert len(calls(fake_hub, "POST", "/commit/")) == 1
    assert len(calls(fake_hub, "POST", "/info/lfs/objects/batch")) == 1
    assert len(calls(fake_hub, "PUT", "/_lfs/")) == 2  # the two shards, nothing else
    assert len(calls(fake_hub, "POST", "/api/validate-yaml")) == 2  # README.md, twice in 2.4
    assert len(calls(fake_hub, "GET", "/tree/")) == 1  # delete_patterns lists the repo first
    assert all(r.auth for r in fake_hub.log if not r.path.startswith("/_lfs/"))

    fake_hub.clear_log()
    second = write_output(out, 3, 1.0)  # shards 1-2 keep their bytes: the LFS store dedupes them
    info2 = publish(second)
    assert sorted(fake_hub.files_at("org/out")) == sorted(second)  # stale of-00002 shards gone
    assert len(calls(fake_hub, "POST", "/commit/")) == 1 and info2.oid != info.oid
    assert len(calls(fake_hub, "PUT", "/_lfs/")) == 1  # only model-00003-of-00003

    fake_hub.clear_log()
    info3 = publish(second)  # nothing changed: no commit, the client asks model_info instead
    assert info3.oid == info2.oid and not calls(fake_hub, "POST", "/commit/")
    assert calls(fake_hub, "GET", "/api/models/org/out/revision/main")

    (out / "config.json").write_text('{"changed": 1}')
    pr = api.upload_folder(repo_id="org/out", folder_path=out, allow_patterns=["config.json"],
                           commit_message="pr", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and fake_hub.head("org/out", "refs/pr/1") == pr.oid
    assert fake_hub.head("org/out") == info2.oid


def test_upload_needs_valid_token(fake_hub, tmp_path):
    fake_hub.add_repo("org/out", {})
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=fake_hub.url, token="hf_wrong").upload_folder(
            repo_id="org/out", folder_path=tmp_path)
    assert info.value.response.status_code == 401


# ---- fault injection ------------------------------------------------------------------------

def test_500_on_get_is_not_retried(fake_hub, tmp_path):
    sha = fake_hub.add_repo("org/m", {"config.json": b"{}"})
    fake_hub.fail_next("config.json", status=500, method="GET")
    kw = dict(revision=sha, cache_dir=tmp_path, endpoint=fake_hub.url, token=TOKEN)
    with pytest.raises(HfHubHTTPError) as info:
        hf_hub_download("org/m", "config.json", **kw)
    assert type(info.value) is HfHubHTTPError and info.value.response.status_code == 500
    assert [(r.method, r.status) for r in fake_hub.log] == [("HEAD", 200), ("GET", 500)]
    assert hf_hub_download("org/m", "config.json", **kw)  # one-shot: next call works


def test_500_on_head_is_retried_once_then_local_entry_error(fake_hub, tmp_path, monkeypatch):
    slept = no_sleep(monkeypatch)
    sha = fake_hub.add_repo("org/m", {"config.json": b"{}"})
    kw = dict(revision=sha, cache_dir=tmp_path, endpoint=fake_hub.url, token=TOKEN)
    fake_hub.fail_next("config.json", status=500, method="HEAD")
    assert hf_hub_download("org/m", "config.json", **kw)
    assert [(r.method, r.status) for r in fake_hub.log] == [
        ("HEAD", 500), ("HEAD", 200), ("GET", 200)]
    assert slept == []
    fake_hub.clear_log()
    fake_hub.fail_next("other.json", status=503, method="HEAD", times=100)
    fake_hub.commit_files("org/m", {"other.json": b"{}"})
    with pytest.raises(LocalEntryNotFoundError) as info:  # NOT an HfHubHTTPError
        hf_hub_download("org/m", "other.json", cache_dir=tmp_path, endpoint=fake_hub.url)
    assert info.value.__cause__.response.status_code == 503
    assert len(fake_hub.log) == 7 and slept == [1, 2, 4, 8, 8]  # 1 + (1 + 5 retries)


def test_429_on_get_is_retried(fake_hub, tmp_path, monkeypatch):
    slept = no_sleep(monkeypatch)
    sha = fake_hub.add_repo("org/m", {"config.json": b"{}"})
    fake_hub.fail_next("config.json", status=429, method="GET")
    hf_hub_download("org/m", "config.json", revision=sha, cache_dir=tmp_path,
                    endpoint=fake_hub.url)
    assert [r.status for r in fake_hub.log] == [200, 429, 200] and slept == [1]


def test_truncated_download_is_fetched_again(fake_hub, tmp_path, monkeypatch):
    """http_get retries a short body; it resumes with Range only from bytes it wrote, and
    iter_bytes hands out 10 MiB chunks, so a small file is fetched again from the start."""
    no_sleep(monkeypatch)
    files = sharded_files()
    sha = fake_hub.add_repo("org/m", files)
    fake_hub.fail_next(SHARDS2[0], truncate=True)  # a plain truncation skips the HEAD
    path = hf_hub_download("org/m", SHARDS2[0], revision=sha, cache_dir=tmp_path,
                           endpoint=fake_hub.url)
    assert open(path, "rb").read() == files[SHARDS2[0]]
    gets = calls(fake_hub, "GET")
    assert [(r.range, r.status) for r in gets] == [(None, 200), (None, 200)]


def test_truncated_body_errors(fake_hub, tmp_path, monkeypatch):
    no_sleep(monkeypatch)
    sha = fake_hub.add_repo("org/m", sharded_files())
    fake_hub.fail_next(SHARDS2[1], truncate=0, method="GET", times=100, full_only=True)
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    assert api.parse_safetensors_file_metadata("org/m", SHARDS2[1], revision=sha)  # Range: spared
    fake_hub.clear_log()
    with pytest.raises(httpx.RemoteProtocolError):  # no byte ever arrives: retries run out
        hf_hub_download("org/m", SHARDS2[1], revision=sha, cache_dir=tmp_path,
                        endpoint=fake_hub.url)
    assert len(calls(fake_hub, "GET")) == 6  # 1 + 5 resume attempts
    assert not list((tmp_path / "models--org--m" / "blobs").glob("*"))  # no partial blob kept
    fake_hub.fail_next("/api/models/org/m", truncate=True)
    with pytest.raises(httpx.RemoteProtocolError):
        api.model_info("org/m")
    fake_hub.fail_next(SHARDS2[0], truncate=True, method="GET")
    with pytest.raises(httpx.RemoteProtocolError):
        api.parse_safetensors_file_metadata("org/m", SHARDS2[0], revision=sha)


def test_consistent_truncation_goes_unnoticed_by_the_client(fake_hub, tmp_path):
    files = sharded_files()
    sha = fake_hub.add_repo("org/m", files)
    fake_hub.fail_next(SHARDS2[0], truncate=1000, consistent=True, full_only=True, times=2)
    meta = HfApi(endpoint=fake_hub.url, token=TOKEN).parse_safetensors_file_metadata(
        "org/m", SHARDS2[0], revision=sha)  # a Range read: not affected
    path = hf_hub_download("org/m", SHARDS2[0], revision=sha, cache_dir=tmp_path,
                           endpoint=fake_hub.url)
    assert open(path, "rb").read() == files[SHARDS2[0]][:1000]  # HEAD and GET both said 1000
    assert meta.tensors["a.weight"].data_offsets[1] > 1000


def test_delay(fake_hub):
    fake_hub.add_repo("org/m", {"config.json": b"{}"})
    fake_hub.fail_next("/api/models/org/m", delay=0.3)
    start = time.monotonic()
    HfApi(endpoint=fake_hub.url, token=TOKEN).model_info("org/m")
    assert time.monotonic() - start >= 0.3


# ---- wire conventions (plain http.client, one keep-alive connection) ------------------------

def test_wire_conventions_on_one_connection(fake_hub):
    data = st_bytes({"w": torch.ones(64)})
    sha = fake_hub.add_repo("org/m", {"model.safetensors": data, "sub/x.txt": b"hello"})
    conn = http.client.HTTPConnection("127.0.0.1", int(fake_hub.url.rsplit(":", 1)[1]), timeout=5)

    def ask(method, path, headers=None):
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()

    resp, body = ask("HEAD", "/org/m/resolve/main/model.safetensors")
    assert body == b"" and int(resp.headers["Content-Length"]) == len(data)
    assert resp.headers["ETag"] == f'"{lfs_oid(data)}"' and resp.headers["X-Repo-Commit"] == sha
    resp, body = ask("GET", "/org/m/resolve/main/sub/x.txt")
    assert body == b"hello" and resp.headers["ETag"] == f'"{blob_oid(b"hello")}"'
    resp, body = ask("GET", "/org/m/resolve/main/model.safetensors", {"Range": "bytes=0-7"})
    assert resp.status == 206 and body == data[:8]
    assert resp.headers["Content-Range"] == f"bytes 0-7/{len(data)}"
    resp, body = ask("GET", "/org/m/resolve/main/nope")
    assert (resp.status, resp.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert json.loads(body)["error"] and resp.headers["X-Repo-Commit"] == sha
    resp, body = ask("HEAD", "/org/m/resolve/refs%2Fpr%2F9/sub/x.txt")
    assert (resp.status, resp.headers["X-Error-Code"], body) == (404, "RevisionNotFound", b"")
    resp, body = ask("GET", "/org/m/resolve/main/sub/x.txt", {"Range": "bytes=99-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == "bytes */5"
    resp, body = ask("GET", "/nowhere")
    assert resp.status == 404 and resp.headers["X-Error-Code"] == "RouteNotFound"
    conn.close()
    assert len(fake_hub.log) == 7
