"""Recipe grids (docs/grid.md): expansion of a grid file into validated points, point identity and
labels, and the slice partition for ``--shard i/n``. The runner that merges the points builds on
this API."""

from mergekit_like.grid.expand import (Grid, GridPoint, dump_doc, load_grid, load_grid_text,
                                       partition)
from mergekit_like.grid.paths import PathError, get_path, parse_path, set_path, short_keys

__all__ = ["Grid", "GridPoint", "PathError", "dump_doc", "get_path", "load_grid",
           "load_grid_text", "parse_path", "partition", "set_path", "short_keys"]
