"""Hugging Face Hub access (docs/hub.md): settings resolved at call time, a checkpoint source that
validates from headers before downloading shards, and publishing merged models."""
