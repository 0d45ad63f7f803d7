"""Twin-Merging (twin.md): the bundle format, materialize, and the router."""
