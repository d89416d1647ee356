"""Data in and out: image sources, the DINOv2 backbone, Zarr stores and the Ray jobs that fill them."""
