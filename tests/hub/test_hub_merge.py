"""Merging from Hub models against the fake Hub (tests/fake_hub.py), with the real client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergekit_like.demo import LlamaShape, make_family
from support.helpers import folder_digest, folder_files, load_folder, run_cli, ties_recipe, write_recipe

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
SHARDS = [6000, None, 9000]          # base sharded, ft1 one file, ft2 sharded differently


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "fam", SHAPE, n_finetunes=2, shard_bytes=SHARDS)


@pytest.fixture
def hub_family(fake_hub, family):
    """The family uploaded as org/base, org/ft1, org/ft2 (plus files a merge must not fetch)."""
    shas = {}
    for folder in family:
        files = folder_files(folder)
        files["README.md"] = b"# card\n"
        files["pytorch_model.bin"] = b"pickle bytes that must never be downloaded"
        shas[folder.name] = fake_hub.add_repo(f"org/{folder.name}", files)
    return shas


def hub_args(fake_hub, cache: Path) -> list[str]:
    return ["--endpoint", fake_hub.url, "--cache-dir", str(cache), "-q"]


def weights_digest(folder: Path) -> dict[str, str]:
    return {k: v for k, v in folder_digest(folder).items()
            if k.endswith(".safetensors") or k.endswith(".index.json")}


def shard_gets(fake_hub) -> list[str]:
    """Paths of whole-file GETs of weight files (Range reads of headers excluded)."""
    return [r.path for r in fake_hub.log
            if r.method == "GET" and not r.range and "/resolve/" in r.path
            and r.path.endswith((".safetensors", ".bin"))]


def test_hub_merge_equals_local_merge_and_fetches_only_what_it_needs(
        fake_hub, family, hub_family, tmp_path, capsys):
    local = write_recipe(tmp_path / "local.yml", ties_recipe(*[str(f) for f in family]))
    code, _, err = run_cli(["merge", local, tmp_path / "out_local", "-q"], capsys)
    assert code == 0, err
    remote = write_recipe(tmp_path / "hub.yml", ties_recipe("org/base", "org/ft1@main", "org/ft2"))
    code, _, err = run_cli(["merge", remote, tmp_path / "out_hub",
                            *hub_args(fake_hub, tmp_path / "cache")], capsys)
    assert code == 0, err
    assert weights_digest(tmp_path / "out_hub") == weights_digest(tmp_path / "out_local")
    # every weight shard fetched exactly once; no pickle, no README
    gets = shard_gets(fake_hub)
    assert len(gets) == len(set(gets))
    expected = {f"{f.name}/{p.name}" for f in family for p in f.glob("*.safetensors")}
    assert {g.split("/resolve/")[0].split("/")[-1] + "/" + g.rsplit("/", 1)[1] for g in gets} \
        == expected
    assert not any(r.path.endswith(("pytorch_model.bin", "README.md")) for r in fake_hub.log)
    assert all(r.host.split(":")[0] == "127.0.0.1" for r in fake_hub.log)
    card = (tmp_path / "out_hub" / "README.md").read_text()
    assert f"org/ft1 (commit {hub_family['ft1']})" in card
    assert "- org/base\n- org/ft1\n- org/ft2\n" in card


def test_second_run_downloads_nothing(fake_hub, family, hub_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "hub.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    args = hub_args(fake_hub, tmp_path / "cache")
    code, out, _ = run_cli(["merge", recipe, tmp_path / "a", *args, "--dry-run"], capsys)
    total = sum(p.stat().st_size for f in family for p in f.glob("*.safetensors"))
    assert code == 0 and f"to download from the Hub: {total / 1000:.2f} KB" in out
    assert shard_gets(fake_hub) == [] and not (tmp_path / "a").exists()
    assert run_cli(["merge", recipe, tmp_path / "a", *args], capsys)[0] == 0
    code, out, _ = run_cli(["merge", recipe, tmp_path / "a2", *args, "--dry-run"], capsys)
    assert code == 0 and "to download from the Hub: 0 B" in out
    fake_hub.clear_log()
    assert run_cli(["merge", recipe, tmp_path / "b", *args], capsys)[0] == 0
    assert shard_gets(fake_hub) == []
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")


def test_offline_uses_the_cache_and_sends_nothing(fake_hub, hub_family, tmp_path, capsys,
                                                  monkeypatch):
    recipe = write_recipe(tmp_path / "hub.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    cache = tmp_path / "cache"
    assert run_cli(["merge", recipe, tmp_path / "a", *hub_args(fake_hub, cache)], capsys)[0] == 0
    fake_hub.clear_log()
    code, _, err = run_cli(["merge", recipe, tmp_path / "b", *hub_args(fake_hub, cache),
                            "--offline"], capsys)
    assert code == 0, err
    assert fake_hub.log == []
    assert weights_digest(tmp_path / "a") == weights_digest(tmp_path / "b")
    code, _, err = run_cli(["merge", recipe, tmp_path / "c", *hub_args(fake_hub, tmp_path / "empty"),
                            "--offline"], capsys)
    assert code == 2 and "is not in the local cache" in err and "offline mode is on" in err
    assert not (tmp_path / "c").exists()


def test_low_disk_keeps_one_shard_per_model(fake_hub, family, hub_family, tmp_path, capsys,
                                            monkeypatch):
    from mergekit_like.hub import source as hub_source

    peaks: list[int] = []
    real_fetch = hub_source.HubSource._fetch_shard

    def fetch(self, rel):
        path = real_fetch(self, rel)
        peaks.append(sum(p.stat().st_size for d in private_dirs
                         for p in Path(d).glob("*/blobs/*") if p.is_file()))
        return path

    private_dirs: list[Path] = []
    real_init = hub_source.HubSource.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        private_dirs.append(self._cache)

    monkeypatch.setattr(hub_source.HubSource, "_fetch_shard", fetch)
    monkeypatch.setattr(hub_source.HubSource, "__init__", init)
    recipe = write_recipe(tmp_path / "hub.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", *hub_args(fake_hub, tmp_path / "c"),
                            "--low-disk"], capsys)
    assert code == 0, err
    largest = sum(max(p.stat().st_size for p in f.glob("*.safetensors")) for f in family)
    assert peaks and max(peaks) <= largest
    assert len(peaks) == sum(len(list(f.glob("*.safetensors"))) for f in family)
    assert all(not d.exists() for d in private_dirs)       # private caches removed
    local = write_recipe(tmp_path / "local.yml", ties_recipe(*[str(f) for f in family]))
    assert run_cli(["merge", local, tmp_path / "ref", "-q"], capsys)[0] == 0
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")


def test_revision_pinning(fake_hub, family, hub_family, tmp_path, capsys):
    first = hub_family["ft1"]
    changed = folder_files(family[1])
    t = load_folder(family[1])
    name = "model.layers.0.mlp.up_proj.weight"
    from safetensors.torch import save
    changed["model.safetensors"] = save({k: (v + 1 if k == name else v) for k, v in t.items()})
    fake_hub.commit_files("org/ft1", changed)
    pinned = write_recipe(tmp_path / "pin.yml", ties_recipe("org/base", f"org/ft1@{first}", "org/ft2"))
    local = write_recipe(tmp_path / "local.yml", ties_recipe(*[str(f) for f in family]))
    args = hub_args(fake_hub, tmp_path / "cache")
    assert run_cli(["merge", pinned, tmp_path / "pinned", *args], capsys)[0] == 0
    assert run_cli(["merge", local, tmp_path / "local", "-q"], capsys)[0] == 0
    assert weights_digest(tmp_path / "pinned") == weights_digest(tmp_path / "local")
    head = write_recipe(tmp_path / "head.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    assert run_cli(["merge", head, tmp_path / "head", *args], capsys)[0] == 0
    assert weights_digest(tmp_path / "head") != weights_digest(tmp_path / "local")
    assert first in (tmp_path / "pinned" / "README.md").read_text()


def test_inspect_hub_reads_headers_only(fake_hub, hub_family, tmp_path, capsys):
    code, out, err = run_cli(["inspect", "org/base", *hub_args(fake_hub, tmp_path / "c")[:4]],
                             capsys)
    assert code == 0, err
    assert "model-00001-of-" in out and "parameters" in out
    assert shard_gets(fake_hub) == []
    assert any(r.range for r in fake_hub.log)


def test_token_is_sent_and_never_shown(fake_hub, family, tmp_path, capsys, monkeypatch):
    token = "hf_" + "s3cret" * 6
    fake_hub.valid_tokens.add(token)
    for folder in family:
        fake_hub.add_repo(f"org/{folder.name}", folder_files(folder), private=True)
    recipe = write_recipe(tmp_path / "hub.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    code, _, err = run_cli(["merge", recipe, tmp_path / "anon", *hub_args(fake_hub, tmp_path / "c")],
                           capsys)
    assert code == 2 and " not found on " in err and "set HF_TOKEN" in err
    assert not (tmp_path / "anon").exists()
    monkeypatch.setenv("HF_TOKEN", token)
    fake_hub.clear_log()
    code, out, err = run_cli(["merge", recipe, tmp_path / "out", *hub_args(fake_hub, tmp_path / "c")],
                             capsys)
    assert code == 0, err
    assert token not in out + err
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes()
    assert fake_hub.log and all(r.auth for r in fake_hub.log)


def test_cache_dir_env(fake_hub, hub_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    recipe = write_recipe(tmp_path / "hub.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "envcache" / "models--org--base").is_dir()
    assert os.listdir(tmp_path / "envcache")
    assert torch.is_tensor(next(iter(load_folder(tmp_path / "out").values())))
