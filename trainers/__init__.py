"""Models, losses and training loops (FlatDINO VAE, LightningDiT, pixel decoder); built by later issues."""
