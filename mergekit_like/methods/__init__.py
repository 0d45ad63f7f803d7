"""The static merge methods: one thin adapter per method over the math in ``ops/``. The list of
every method a recipe may name is ``mergekit_like/registry.py``."""
