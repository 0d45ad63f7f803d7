"""Twin-Merging (docs/methods/twin.md): the bundle format, materialize, and the router."""
