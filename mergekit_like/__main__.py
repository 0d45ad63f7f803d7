from mergekit_like.cli import entrypoint

entrypoint()
