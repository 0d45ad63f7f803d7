"""The merge engine (run.py reads top to bottom: plan → read → merge → write)."""

from mergekit_like.engine.options import DEFAULT_SHARD_BYTES, MergeOptions
from mergekit_like.engine.plan import MergePlan, SourceOpener, build_plan
from mergekit_like.engine.run import MergeResult, run_merge, run_pass

__all__ = ["DEFAULT_SHARD_BYTES", "MergeOptions", "MergePlan", "MergeResult", "SourceOpener",
           "build_plan", "run_merge", "run_pass"]
