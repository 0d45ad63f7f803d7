"""Checkpoint reading, output writing and side files: all file I/O lives in this package."""
