"""mergekit_like: streaming, memory-bounded model merging with mergekit-compatible recipes."""

__version__ = "0.1.0"
