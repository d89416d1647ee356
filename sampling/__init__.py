"""Generation: a trained DiT -> latents -> DINOv2 features -> pixels (`flatdino sample`)."""
