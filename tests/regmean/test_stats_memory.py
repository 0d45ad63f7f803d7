"""The statistics passes hold nothing per text (docs/methods/regmean.md §2): peak RSS of
`stats gram` and `stats fisher` is the same for 4 and 40 texts, where keeping one Gram set or
one gradient per text would add hundreds of MB."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mergekit_like.demo import LlamaShape, make_family

pytest.importorskip("transformers")
SHAPE = LlamaShape(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4)
PROBE = """
import resource, sys
from mergekit_like.cli import main
code = main(sys.argv[1:] + ["--device", "cpu", "-q"])
print("RSS", code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kb(args: list) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                          text=True, check=True)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RSS")][-1]
    _, code, kb = line.split()
    assert code == "0", done.stderr
    return int(kb)


@pytest.mark.parametrize("command", ["gram", "fisher"])
def test_peak_memory_is_flat_in_the_number_of_texts(tmp_path, command):
    _, model = make_family(tmp_path / "fam", SHAPE, 1)
    peaks = []
    for n in (4, 40):
        data = tmp_path / f"t{n}.jsonl"
        data.write_text("".join(json.dumps({"input_ids": [(7 * k + i) % 64 for i in range(64)]})
                                + "\n" for k in range(n)))
        peaks.append(_peak_rss_kb(["stats", command, "--model", model, "--data", data,
                                   "--out", tmp_path / f"{command}{n}"]))
    per_text = {"gram": 10.5e3, "fisher": 5.2e3}[command]  # KB one text's Grams / gradients hold
    assert peaks[1] - peaks[0] < 4 * per_text, peaks      # 36 more texts, < 4 texts' worth
