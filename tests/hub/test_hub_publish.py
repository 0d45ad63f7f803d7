"""`mergekit-like publish` (and `merge --publish`) against the fake Hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergekit_like.demo import LlamaShape, make_family
from support.helpers import run_cli, shard_names, write_recipe

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
TOKEN = "hf_" + "publishtoken" * 3


@pytest.fixture
def merged(tmp_path, capsys):
    """A finished local merge with three output shards, and its recipe."""
    fam = make_family(tmp_path / "fam", SHAPE, n_finetunes=2)
    recipe = write_recipe(tmp_path / "r.yml", {
        "merge_method": "task_arithmetic", "base_model": str(fam[0]),
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fam[1:]]})
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", recipe, out, "-q", "--out-shard-size", "20KB"], capsys)
    assert code == 0, err
    assert len(shard_names(out)) >= 3
    return out, recipe


@pytest.fixture
def token(fake_hub, monkeypatch):
    fake_hub.valid_tokens.add(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def commits(fake_hub) -> list:
    return [r for r in fake_hub.log if r.method == "POST" and "/commit/" in r.path]


def test_publish_uploads_everything_in_one_commit(fake_hub, merged, token, capsys):
    out, _ = merged
    code, stdout, err = run_cli(["publish", out, "me/merged", "--endpoint", fake_hub.url], capsys)
    assert code == 0, err
    assert len(commits(fake_hub)) == 1
    files = fake_hub.files_at("me/merged")
    local = {p.name for p in out.iterdir() if p.is_file()}
    assert set(files) == local
    for name in local:
        assert files[name] == (out / name).read_bytes()
    assert "/commit/" in stdout and stdout.strip().startswith(fake_hub.url)
    meta = front_matter(files["README.md"].decode())
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert {"merge", "mergekit_like", "task_arithmetic"} <= set(meta["tags"])
    assert TOKEN not in stdout + err
    assert "absolute local paths" in err          # the recipe names tmp_path folders


def test_republish_removes_stale_shards(fake_hub, merged, token, tmp_path, capsys):
    out, recipe = merged
    assert run_cli(["publish", out, "me/merged", "--endpoint", fake_hub.url], capsys)[0] == 0
    before = set(fake_hub.files_at("me/merged"))
    code, _, err = run_cli(["merge", recipe, out, "-q", "--overwrite"], capsys)  # one shard now
    assert code == 0, err
    assert run_cli(["publish", out, "me/merged", "--endpoint", fake_hub.url], capsys)[0] == 0
    after = set(fake_hub.files_at("me/merged"))
    assert any(n.startswith("model-") for n in before)
    assert not any(n.startswith("model-") for n in after)
    assert "model.safetensors.index.json" not in after
    assert after == {p.name for p in out.iterdir() if p.is_file()}


def test_merge_then_publish_in_one_command(fake_hub, merged, token, tmp_path, capsys):
    _, recipe = merged
    code, stdout, err = run_cli(["merge", recipe, tmp_path / "o2", "-q", "--publish", "me/m2",
                                 "--endpoint", fake_hub.url], capsys)
    assert code == 0, err
    assert "model.safetensors" in fake_hub.files_at("me/m2")


def test_publish_refuses_incomplete_output(fake_hub, merged, token, capsys):
    out, _ = merged
    shard_path = out / shard_names(out)[1]
    shard_path.unlink()
    code, _, err = run_cli(["publish", out, "me/merged", "--endpoint", fake_hub.url], capsys)
    assert code == 2 and shard_path.name in err
    assert fake_hub.log == []


def test_publish_needs_a_token(fake_hub, merged, capsys):
    out, _ = merged
    code, _, err = run_cli(["publish", out, "me/merged", "--endpoint", fake_hub.url], capsys)
    assert code == 2 and "publishing needs a token; set HF_TOKEN" in err
    assert fake_hub.log == []


@pytest.mark.parametrize("repo", ["merged", "a/b/c", "bad name/x"])
def test_publish_checks_the_repo_id(fake_hub, merged, token, repo, capsys):
    out, _ = merged
    code, _, err = run_cli(["publish", out, repo, "--endpoint", fake_hub.url], capsys)
    assert code == 2 and "namespace/name" in err
    assert fake_hub.log == []


def test_merge_publish_without_token_fails_before_merging(fake_hub, merged, tmp_path, capsys):
    _, recipe = merged
    code, _, err = run_cli(["merge", recipe, tmp_path / "o3", "-q", "--publish", "me/m3",
                            "--endpoint", fake_hub.url], capsys)
    assert code == 2 and "set HF_TOKEN" in err
    assert not Path(tmp_path / "o3").exists()
