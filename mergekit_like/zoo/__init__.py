"""A zoo of tiny homologous models for measuring merge quality (no download, CPU, minutes).

* ``tasks``: a shared token vocabulary and seeded synthetic tasks (skills, reasoning, domain).
* ``train``: a tiny Llama, trained on answer tokens only.
* ``settings``: ``ZooSettings`` and the ``FULL`` / ``FAST`` presets.
* ``build``: ``build_zoo(out, settings)``: splits, a base, one fine-tune per task, ``zoo.json``.
* ``quality``: merge the skill fine-tunes with each method and tabulate held-out accuracy.

transformers is needed to train or evaluate (the ``[runtime]`` extra).
"""

from mergekit_like.zoo.build import Zoo, build_zoo, load_manifest, settings_hash
from mergekit_like.zoo.settings import DEFAULT_DIRS, FAST, FULL, PRESETS, ZooSettings

__all__ = ["DEFAULT_DIRS", "FAST", "FULL", "PRESETS", "Zoo", "ZooSettings", "build_zoo",
           "load_manifest", "settings_hash"]
