"""Hostile inputs that try to leak a secret into OUT (and on to the Hub) or run code on load:
side files linked out of their model folder or Hub cache, non-regular side files, a config.json
linked elsewhere, the token itself in a file about to be published, and pickle weights in
``eval``."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from mergekit_like.demo import LlamaShape, make_family
from support.helpers import expect_merge_error, run_cli, write_recipe

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
SECRET = "hf_" + "leakedsecret" * 3
PUBLISH_TOKEN = "hf_" + "publishtoken" * 3


@pytest.fixture
def fam(tmp_path):
    return make_family(tmp_path / "fam", SHAPE, n_finetunes=1)


@pytest.fixture
def token_file(tmp_path):
    """A stand-in for HF_HOME/token, outside every model folder."""
    path = tmp_path / "hf_home" / "token"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


@pytest.fixture
def no_hang():
    """A FIFO that gets opened would block the merge forever: fail instead."""
    def expire(*_):
        raise TimeoutError("the merge blocked (a FIFO was opened?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def recipe_of(base: Path | str, ft: Path | str) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(ft), "parameters": {"weight": 1.0}}], "dtype": "float32"}


def merge(tmp_path, capsys, doc, out_name="out", extra=()) -> tuple[Path, str]:
    out = tmp_path / out_name
    code, _, err = run_cli(["merge", write_recipe(tmp_path / f"{out_name}.yml", doc), out, "-q",
                            *extra], capsys)
    assert code == 0, err
    return out, err


def assert_secret_absent(out: Path, secret: str = SECRET) -> None:
    for p in out.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


# ---- local folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("linked", ["tokenizer_config.json", "generation_config.json",
                                    "modeling_custom.py"])
def test_side_file_linked_out_of_its_folder_is_not_copied(fam, token_file, tmp_path, capsys,
                                                          linked):
    base, ft = fam
    (base / "real_tokenizer.json").write_text('{"version": "1.0"}')
    os.symlink("real_tokenizer.json", base / "tokenizer.json")   # inside the folder: copied
    if linked == "modeling_custom.py":
        config = json.loads((base / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
        (base / "config.json").write_text(json.dumps(config))
    (base / linked).unlink(missing_ok=True)
    os.symlink(token_file, base / linked)
    out, err = merge(tmp_path, capsys, recipe_of(base, ft))
    assert not (out / linked).exists()
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert f"warning: {base}: {linked} not copied: its real path is outside the model folder" \
        in err
    assert_secret_absent(out)


def test_non_regular_side_files_are_skipped_by_name(fam, tmp_path, capsys, no_hang):
    base, ft = fam
    os.mkfifo(base / "tokenizer.json")
    os.symlink("tokenizer.json", base / "special_tokens_map.json")   # a link to the FIFO
    os.symlink("/dev/zero", base / "vocab.txt")                      # a device, outside
    (base / "merges.txt").write_text("#version: 0.2\n")
    out, err = merge(tmp_path, capsys, recipe_of(base, ft))
    assert {p.name for p in out.iterdir()} >= {"config.json", "merges.txt"}
    for name in ("tokenizer.json", "special_tokens_map.json", "vocab.txt"):
        assert not (out / name).exists()
    assert f"{base}: tokenizer.json not copied: it is not a regular file" in err
    assert f"{base}: special_tokens_map.json not copied: it is not a regular file" in err
    assert f"{base}: vocab.txt not copied: its real path is outside the model folder" in err


def test_config_json_linked_out_of_its_folder_is_refused(fam, tmp_path, capsys):
    base, ft = fam
    elsewhere = tmp_path / "secrets.json"
    config = json.loads((base / "config.json").read_text())
    elsewhere.write_text(json.dumps({**config, "hub_token": SECRET}))
    (base / "config.json").unlink()
    os.symlink(elsewhere, base / "config.json")
    line = expect_merge_error(tmp_path, capsys, recipe_of(base, ft), "config.json",
                              "outside the model folder")
    assert SECRET not in line


# ---- Hub models ------------------------------------------------------------------------------

def _hub_repos(fake_hub, fam) -> dict[str, bytes]:
    tok = {"tokenizer.json": b'{"version": "1.0", "model": {}}',
           "tokenizer_config.json": b'{"model_max_length": 128}'}
    for folder in fam:
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        fake_hub.add_repo(f"org/{folder.name}", {**files, **(tok if folder.name == "base" else {})})
    return tok


def test_hub_cache_entry_linked_out_of_the_repo_cache_is_not_copied(
        fake_hub, fam, token_file, tmp_path, capsys):
    tok = _hub_repos(fake_hub, fam)
    args = ["--endpoint", fake_hub.url, "--cache-dir", str(tmp_path / "cache")]
    doc = recipe_of("org/base", "org/ft1")
    first, _ = merge(tmp_path, capsys, doc, "first", args)
    assert (first / "tokenizer_config.json").read_bytes() == tok["tokenizer_config.json"]
    # a tampered cache: the snapshot entry now links to the token file
    snapshot = next((tmp_path / "cache" / "models--org--base" / "snapshots").iterdir())
    (snapshot / "tokenizer_config.json").unlink()
    os.symlink(token_file, snapshot / "tokenizer_config.json")
    for name, extra in (("online", args), ("offline", [*args, "--offline"])):
        out, err = merge(tmp_path, capsys, doc, name, extra)
        assert (out / "tokenizer.json").read_bytes() == tok["tokenizer.json"]  # blob link: ok
        assert not (out / "tokenizer_config.json").exists(), name
        assert "tokenizer_config.json not copied: its real path is outside the model's Hub " \
               "cache folder" in err, (name, err)
        assert_secret_absent(out)


# ---- publish ---------------------------------------------------------------------------------

@pytest.fixture
def hub_token(fake_hub, monkeypatch):
    fake_hub.valid_tokens.add(PUBLISH_TOKEN)
    monkeypatch.setenv("HF_TOKEN", PUBLISH_TOKEN)
    return PUBLISH_TOKEN


def test_publish_refuses_a_file_holding_the_token(fake_hub, fam, hub_token, tmp_path, capsys):
    base, ft = fam
    (base / "tokenizer_config.json").write_text(json.dumps({"note": f"token={hub_token}"}))
    out, _ = merge(tmp_path, capsys, recipe_of(base, ft))       # an ordinary side file
    code, stdout, err = run_cli(["publish", out, "me/merged", "--endpoint", fake_hub.url], capsys)
    assert code == 2 and "Traceback" not in err
    errors = [ln for ln in err.strip().splitlines() if not ln.startswith("publishing ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert str(out / "tokenizer_config.json") in errors[0]
    assert "contains the Hub token" in errors[0]
    assert hub_token not in stdout + err
    assert fake_hub.log == []                  # not even the repo was created
    assert "me/merged" not in fake_hub.repos


def test_merge_publish_stops_a_hard_linked_token(fake_hub, fam, hub_token, tmp_path, capsys):
    """A hard link has its real path inside the folder; the publish scan still catches it."""
    base, ft = fam
    (tmp_path / "token").write_text(hub_token)
    try:
        os.link(tmp_path / "token", base / "tokenizer_config.json")
    except OSError:
        pytest.skip("no hard links here")
    recipe = write_recipe(tmp_path / "r.yml", recipe_of(base, ft))
    code, stdout, err = run_cli(["merge", recipe, tmp_path / "out", "-q", "--publish",
                                 "me/m2", "--endpoint", fake_hub.url], capsys)
    assert code == 2 and "tokenizer_config.json contains the Hub token" in err, err
    assert hub_token not in stdout + err
    assert not any(r.method in ("POST", "PUT") for r in fake_hub.log)
    assert "me/m2" not in fake_hub.repos


def test_token_scan_finds_a_match_across_chunks(tmp_path):
    from mergekit_like.hub.publish import _holds

    path = tmp_path / "blob"
    needle = b"hf_abcdefgh"
    for offset in range(0, 24):
        path.write_bytes(b"x" * offset + needle + b"y" * 7)
        assert _holds(path, needle, chunk=5), offset
    path.write_bytes(b"hf_abcdefg" + b"x" + b"h")
    assert not _holds(path, needle, chunk=5)


# ---- eval on pickle weights ------------------------------------------------------------------

class _Marker:
    """Unpickling this creates a folder: proof that loading ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from support.tiny_llama import save_tiny_llama, write_jsonl

    root = tmp_path_factory.mktemp("pickle_eval")
    safe = save_tiny_llama(root / "safe", 0)
    plain = root / "plain"
    plain.mkdir()
    (plain / "config.json").write_bytes((safe / "config.json").read_bytes())
    torch.save(load_file(str(safe / "model.safetensors")), plain / "pytorch_model.bin")
    data = write_jsonl(root / "d.jsonl", [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 3]}])
    return safe, plain, data


def _one_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_eval_refuses_pickle_weights_without_allow_pickle(tiny, capsys):
    _, plain, data = tiny
    code, out, err = run_cli(["eval", plain, "--data", data, "-q", "--device", "cpu"], capsys)
    line = _one_line(code, err)
    assert "pytorch_model.bin" in line and "--allow-pickle" in line and out == ""


def test_eval_malicious_pickle_fails_in_one_line_and_runs_nothing(tiny, tmp_path, capsys):
    safe, _, data = tiny
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_bytes((safe / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Marker(marker)}, evil / "pytorch_model.bin")
    for extra in ([], ["--allow-pickle"]):
        code, out, err = run_cli(["eval", evil, "--data", data, "-q", "--device", "cpu", *extra],
                                 capsys)
        line = _one_line(code, err)
        assert "pytorch_model.bin" in line and out == ""
        assert not marker.exists()


def test_eval_plain_pickle_loads_with_allow_pickle(tiny, capsys):
    safe, plain, data = tiny
    code, want, err = run_cli(["eval", safe, "--data", data, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    code, got, err = run_cli(["eval", plain, "--data", data, "-q", "--device", "cpu",
                              "--allow-pickle"], capsys)
    assert code == 0, err
    numbers = re.compile(r"\b\d+\.\d{4}\b")
    assert numbers.findall(got) == numbers.findall(want) and len(numbers.findall(want)) == 3
