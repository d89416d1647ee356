"""Pure nn.Modules and their math: DINOv2 features, FlatDINO VAE, LightningDiT, pixel decoder, flow matching. No I/O, no project imports."""
