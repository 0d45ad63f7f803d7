"""Hub failures: one line, the right exit code, nothing at OUT, no token anywhere."""

from __future__ import annotations

import json
import socket

import pytest

from mergekit_like.demo import LlamaShape, make_family
from support.helpers import run_cli, write_recipe
from support.helpers import folder_files, ties_recipe

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "fam", SHAPE, n_finetunes=2, shard_bytes=[6000, None, 9000])


@pytest.fixture
def hub(fake_hub, family):
    for folder in family:
        fake_hub.add_repo(f"org/{folder.name}", folder_files(folder))
    return fake_hub


def merge(hub, tmp_path, capsys, recipe: dict, *extra):
    path = write_recipe(tmp_path / "r.yml", recipe)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["merge", path, out, "--endpoint", hub.url, "--cache-dir",
                                 tmp_path / "cache", "-q", *extra], capsys)
    assert not out.exists(), "nothing may be left at OUT after an error"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, err.strip()


def test_repo_not_found(hub, tmp_path, capsys):
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/nope", "org/ft2"))
    assert code == 2 and err == (f"error: {tmp_path / 'r.yml'}:4 models[0]: org/nope not found on "
                                 f"{hub.url} (if it is private, set HF_TOKEN)")


def test_revision_not_found(hub, tmp_path, capsys):
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/ft1@v9", "org/ft2"))
    assert code == 2 and err == f"error: {tmp_path / 'r.yml'}:4 models[0]: org/ft1 has no revision 'v9'"


def test_gated_without_token(hub, family, tmp_path, capsys):
    hub.add_repo("org/gated", folder_files(family[1]), gated=True)
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/gated", "org/ft2"))
    assert code == 2 and err == (f"error: {tmp_path / 'r.yml'}:4 models[0]: org/gated is gated: "
                                 "accept its terms on the Hub, then set HF_TOKEN")


def test_no_safetensors_weights(hub, tmp_path, capsys):
    hub.add_repo("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"x" * 100})
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/pickled", "org/ft2"))
    assert code == 2 and "org/pickled has no safetensors weights" in err


def test_index_names_a_file_missing_from_the_repo(hub, family, tmp_path, capsys):
    files = folder_files(family[0])
    missing = sorted(n for n in files if n.startswith("model-"))[-1]
    del files[missing]
    hub.add_repo("org/broken", files)
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/broken", "org/ft1", "org/ft2"))
    assert code == 2 and f"has no file '{missing}'" in err and "org/broken@" in err


@pytest.mark.parametrize("evil", ["../evil.safetensors", "/abs/evil.safetensors"])
def test_index_escaping_the_folder_is_refused(hub, family, tmp_path, capsys, evil):
    files = folder_files(family[0])
    index = json.loads(files["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = evil
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo("org/evil", files)
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/evil", "org/ft1", "org/ft2"))
    assert code == 2 and "not a file inside the model folder" in err
    assert not any("evil" in r.path for r in hub.log if "/resolve/" in r.path
                   and r.path.endswith(".safetensors"))


def test_server_error_exits_1(hub, tmp_path, capsys):
    hub.fail_next("/api/models/org/ft1", status=500)
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/ft1", "org/ft2"))
    assert code == 1 and err == f"error: {tmp_path / 'r.yml'}:4 models[0]: Hub error 500 for org/ft1; retry later"


def test_unreachable_endpoint_exits_1(tmp_path, capsys, fake_hub):
    with socket.socket() as s:              # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_recipe(tmp_path / "r.yml", ties_recipe("org/base", "org/ft1", "org/ft2"))
    url = f"http://127.0.0.1:{port}"
    code, _, err = run_cli(["merge", path, tmp_path / "out", "--endpoint", url,
                            "--cache-dir", tmp_path / "c", "-q"], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}:4 models[0] (org/ft1): cannot reach {url}")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_download(hub, family, tmp_path, capsys):
    shard = sorted(p.name for p in family[0].glob("model-*.safetensors"))[0]
    # a body cut short with a matching Content-Length: only the project's own check sees it
    hub.fail_next(f"org/base/resolve/{hub.head('org/base')}/{shard}", truncate=100,
                  consistent=True, full_only=True, times=2)
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/ft1", "org/ft2"))
    assert code == 2 and "truncated download" in err and shard in err and "org/base@" in err


def test_shard_never_arrives(hub, family, tmp_path, capsys):
    shard = sorted(p.name for p in family[0].glob("model-*.safetensors"))[0]
    hub.fail_next(f"/{shard}", truncate=0, full_only=True, times=6)
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/ft1", "org/ft2"))
    assert code == 1 and err.startswith(f"error: cannot reach {hub.url}")


def test_inspect_bad_ref(capsys, tmp_path):
    code, _, err = run_cli(["inspect", "not//valid"], capsys)
    assert code == 2 and "neither an existing folder nor a valid Hub repo id" in err


def test_recipe_checked_against_headers_before_any_shard_download(hub, tmp_path, capsys):
    other = make_family(tmp_path / "other", LlamaShape(vocab_size=64, hidden_size=32,
                                                       intermediate_size=40, num_hidden_layers=2),
                        n_finetunes=0)[0]
    hub.add_repo("org/other", folder_files(other))
    hub.clear_log()
    code, err = merge(hub, tmp_path, capsys, ties_recipe("org/base", "org/ft1", "org/other"))
    assert code == 2 and "shape" in err and "org/other" in err
    assert not [r for r in hub.log if r.method == "GET" and not r.range
                and r.path.endswith(".safetensors")]
