"""The fast zoo, built once per test session and shared by test_zoo.py and test_quality.py.

Both modules import ``fast_zoo``; pytest then holds one fixture definition per module, so the
zoo itself is built by the first of them and found complete (build_zoo's cache) by the second.
"""

from __future__ import annotations

import pytest

ZOO_DIR = "fast-zoo"


@pytest.fixture(scope="session")
def fast_zoo(tmp_path_factory):
    """A complete FAST zoo (mergekit_like.zoo.Zoo) in ``<session temp>/fast-zoo/seed-0``."""
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from mergekit_like.zoo import FAST, Zoo
    from mergekit_like.zoo.build import build_zoos, seed_dir

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.getbasetemp() / ZOO_DIR  # zoo in root/seed-0, as the scripts do
    build_zoos(root, FAST, seeds=[FAST.seed])
    return Zoo.open(seed_dir(root, FAST.seed))
