"""``msattn bench``: speed and memory of the share-net, its training step, the loader and deployment."""
