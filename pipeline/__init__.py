"""Data in and out: image sources, preprocessing, weights and checkpoints, Zarr stores, the shard engine and its jobs, the loaders."""
