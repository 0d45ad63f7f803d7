"""RCP importance stage (docs/methods/rcp.md §1, §3): the equations on the spec's worked example, and the
`importance fisher` / `importance rcp-votes` commands against an independent autograd
computation on a hand-built 2-layer model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.rcp_fixture import family, importance, reference_grads
from safetensors import safe_open

from support.helpers import load_folder, run_cli
from mergekit_like.rcp.method import rcp_merge
from mergekit_like.ops import rcp_votes as V

pytest.importorskip("transformers")

# docs/methods/rcp.md §1 worked example
THETA_T = torch.tensor([1.0, -2.0, 0.5, 0.0])
THETA_R = torch.tensor([0.5, -2.0, 1.5, 0.25])
THETA_PRE = torch.tensor([0.75, -1.0, 0.25, -0.5])
FISHER = torch.tensor([0.5, 4.0, 0.0, 2.0])
GRADS = [torch.tensor([-0.5, 0.25, 0.0, 1.0]), torch.tensor([-0.25, -0.5, 0.0, 2.0]),
         torch.tensor([0.5, 0.25, 0.0, -1.0])]


def _votes(lam: float, zero_grad: str) -> torch.Tensor:
    p = V.penalty(FISHER, THETA_R, THETA_T)
    v = torch.zeros(4, dtype=torch.int8)
    for g in GRADS:
        V.add_votes(v, V.sensitivity(g, THETA_T), V.scaled_penalty(p, lam), zero_grad)
    return v


def test_worked_example_penalty_and_sensitivity():
    assert V.penalty(FISHER, THETA_R, THETA_T).tolist() == [0.125, 0.0, 0.0, 0.125]
    s = torch.stack([V.sensitivity(g, THETA_T) for g in GRADS]).T
    assert s[0].tolist() == [-0.5, -0.25, 0.5] and s[1].tolist() == [-0.5, 1.0, -0.5]
    assert s[2].abs().sum() == 0 and s[3].abs().sum() == 0


@pytest.mark.parametrize("lam, votes, merged, kept", [
    (1.0, [1, 1, 3, -3], [0.75, -3.0, 1.75, 0.25], [0.75, -3.0, 1.5, 0.25]),
    (4.0, [-1, 1, 3, -3], [0.5, -3.0, 1.75, 0.25], [0.5, -3.0, 1.5, 0.25]),
])
def test_worked_example_table(lam, votes, merged, kept):
    v = _votes(lam, "merge")
    assert v.tolist() == votes
    assert rcp_merge(THETA_R, THETA_T, THETA_PRE, V.selection(v)).tolist() == merged
    v_keep = _votes(lam, "keep")
    assert v_keep[2] == 0                      # zero evidence abstains under keep
    assert rcp_merge(THETA_R, THETA_T, THETA_PRE, V.selection(v_keep)).tolist() == kept


def test_infinite_lambda_penalises_exactly_the_weights_with_a_penalty():
    p = torch.tensor([0.0, 1e-30, 2.0])
    assert V.scaled_penalty(p, math.inf).tolist() == [0.0, math.inf, math.inf]
    v = torch.zeros(3, dtype=torch.int8)
    V.add_votes(v, torch.tensor([-5.0, -5.0, -5.0]), V.scaled_penalty(p, math.inf))
    assert v.tolist() == [1, -1, -1]


def test_zero_lambda_with_negative_sensitivity_merges_everything():
    k = 5
    v = torch.zeros(4, dtype=torch.int8)
    p = torch.rand(4) + 0.1
    for _ in range(k):
        V.add_votes(v, -torch.rand(4) - 1e-3, V.scaled_penalty(p, 0.0))
    assert v.tolist() == [k] * 4 and bool(V.selection(v).all())


def test_critical_lambda_matches_votes_at_every_lambda():
    gen = torch.Generator().manual_seed(0)
    k, n = 5, 400
    s = torch.randn(k, n, generator=gen)
    s[:, :20] = 0.0                                    # zero evidence
    p = torch.rand(n, generator=gen) * 0.5
    p[10:40] = 0.0
    for zero_grad in ("merge", "keep"):
        for thr in (0.0, 1.0, -2.0):
            crit = V.critical_lambda(s, p, thr, zero_grad)
            for lam in (0.0, 0.3, 1.0, 3.0, 1e3, math.inf):
                if zero_grad == "keep" and lam == 0.0:
                    continue   # C = 0 with p > 0 abstains in the votes but not in λ* (§3)
                v = torch.zeros(n, dtype=torch.int8)
                for row in s:
                    V.add_votes(v, row, V.scaled_penalty(p, lam), zero_grad)
                assert torch.equal(V.selection(v, thr), lam <= crit), (zero_grad, thr, lam)
    # the spec's j0: λ_{0,k} = [4, 2, −4] → λ* = 2
    s0 = torch.stack([V.sensitivity(g, THETA_T) for g in GRADS])
    crit0 = V.critical_lambda(s0, V.penalty(FISHER, THETA_R, THETA_T))
    assert crit0[0] == 2.0


def test_votes_dtype():
    assert V.votes_dtype(127) == torch.int8 and V.votes_dtype(128) == torch.int16


# ---- the stage, end to end ------------------------------------------------------------------

def _meta(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.metadata()


def test_fisher_and_votes_equal_an_independent_autograd_computation(tmp_path, capsys):
    base, reasoning, domain = family(tmp_path / "fam")
    fisher, stem = importance(tmp_path, base, reasoning, domain, ["0", "1e3", "30"], capsys,
                              n_texts=3, extra=["--kind", "grad_sq"])
    g_r = reference_grads(reasoning, tmp_path / "reason.jsonl")
    g_t = reference_grads(domain, tmp_path / "domain.jsonl")
    theta_r, theta_t = load_folder(reasoning), load_folder(domain)
    got_f = load_folder(fisher)
    assert set(got_f) == set(g_r[0])
    want_f = {n: sum(g[n].square() for g in g_r) / len(g_r) for n in g_r[0]}
    for n in want_f:
        torch.testing.assert_close(got_f[n], want_f[n], rtol=1e-4, atol=1e-12)
    meta = _meta(fisher)
    assert meta["kind"] == "rcp_fisher" and meta["fisher_kind"] == "grad_sq"
    assert meta["n_examples"] == "3"
    for lam_text, lam in (("0", 0.0), ("1e3", 1e3), ("3e1", 30.0)):
        folder = stem.with_name(f"votes_{lam_text}")
        got = load_folder(folder)
        checked = 0
        for n, v in got.items():
            assert v.dtype == torch.int8
            p = want_f[n] * (theta_r[n] - theta_t[n]).square()
            cs = [g[n] * theta_t[n] + lam * p for g in g_t]
            want = sum(torch.where(c <= 0, 1, -1) for c in cs)
            mags = torch.stack([c.abs() for c in cs])
            # exact zeros (unseen tokens) are exact in both; skip only tiny non-zero C (rounding)
            clear = ((mags == 0) | (mags > 1e-3 * mags.median())).all(0)
            assert torch.equal(v[clear].long(), want[clear].long()), (lam, n)
            checked += int(clear.sum())
        assert checked > 0.95 * sum(v.numel() for v in got.values())
        info = json.loads((folder / "importance.json").read_text())
        assert info["kind"] == "rcp_votes" and float(info["penalty_lambda"]) == lam
        assert set(info["tensors"]) == set(got)
        assert 0.0 < info["selected_fraction"] < 1.0
        assert json.loads(info["models"])["domain"]["weights_sha256"] != \
            json.loads(info["models"])["reasoning"]["weights_sha256"]


def test_fisher_default_kind_is_grad_times_weight_squared(tmp_path, capsys):
    base, reasoning, domain = family(tmp_path / "fam")
    fisher, _ = importance(tmp_path, base, reasoning, domain, ["1e3"], capsys, n_texts=2)
    g_r = reference_grads(reasoning, tmp_path / "reason.jsonl")
    theta = load_folder(reasoning)
    got = load_folder(fisher)
    for n in got:
        want = sum((g[n] * theta[n]).square() for g in g_r) / len(g_r)
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-14)


def test_bad_data_is_reported_with_its_line_before_loading(tmp_path, capsys):
    base, reasoning, _ = family(tmp_path / "fam")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n\n{"input_ids": "oops"}\n')
    out = tmp_path / "F"
    code, _, err = run_cli(["importance", "fisher", "--model", reasoning, "--data", data,
                            "--out", out, "-q"], capsys)
    assert code == 2 and f"{data}:3" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_votes_refuse_a_fisher_folder_of_another_shape(tmp_path, capsys):
    from mergekit_like.demo import LlamaShape, make_family

    base, reasoning, domain = family(tmp_path / "fam")
    other = make_family(tmp_path / "other", LlamaShape(vocab_size=32, hidden_size=8,
                                                       intermediate_size=12, num_hidden_layers=2,
                                                       num_attention_heads=2,
                                                       num_key_value_heads=1), 1)[1]
    fisher, stem = importance(tmp_path, base, other, other, ["1e3"], capsys, n_texts=1)
    code, _, err = run_cli(["importance", "rcp-votes", "--model", domain, "--reasoning",
                            reasoning, "--fisher", fisher, "--data", tmp_path / "domain.jsonl",
                            "--out", tmp_path / "V", "-q"], capsys)
    assert code == 2 and "--fisher" in err and "shape" in err
    assert not list(tmp_path.glob("V*"))
    code, _, err = run_cli(["importance", "rcp-votes", "--model", domain, "--reasoning",
                            reasoning, "--fisher", stem.with_name("votes_1e3"), "--data",
                            tmp_path / "domain.jsonl", "--out", tmp_path / "V", "-q"], capsys)
    assert code == 2 and "not a Fisher map" in err


def test_memory_of_the_votes_pass_does_not_grow_with_the_number_of_texts(tmp_path, capsys):
    """Peak RSS of `importance rcp-votes` (in a fresh process) with 20 and with 60 texts: a
    kept per-text gradient would add ~10 MB per text (a 2.5 M-parameter model) = 400 MB."""
    import os
    import subprocess
    import sys

    from support.rcp_fixture import texts

    from mergekit_like.demo import LlamaShape, make_family

    shape = LlamaShape(vocab_size=256, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    base, reasoning, domain = make_family(tmp_path / "fam", shape, 2, delta_scale=0.02)
    fisher_data = texts(tmp_path / "r.jsonl", 2, seed=1, length=64, vocab=256)
    code, _, err = run_cli(["importance", "fisher", "--model", reasoning, "--data", fisher_data,
                            "--out", tmp_path / "fisher", "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    peaks = {}
    for n in (20, 60):
        data = texts(tmp_path / f"d{n}.jsonl", n, seed=n, length=64, vocab=256)
        args = ["importance", "rcp-votes", "--model", str(domain), "--reasoning", str(reasoning),
                "--fisher", str(tmp_path / "fisher"), "--data", str(data), "--out",
                str(tmp_path / f"v{n}"), "--penalty-lambda", "1e3", "--penalty-lambda", "1e6",
                "--device", "cpu", "-q"]
        script = ("import resource, sys\nfrom mergekit_like.cli import main\n"
                  f"code = main({args!r})\n"
                  "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)\n")
        # a fixed mmap threshold: glibc's adaptive one lets freed gradient-sized blocks stay in
        # a fragmented heap, allocator noise that would blur the measurement
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)})
        assert done.returncode == 0, done.stderr
        peaks[n] = int(done.stdout.strip().splitlines()[-1]) * 1024
    assert peaks[60] - peaks[20] < 40 * 2**20, peaks
