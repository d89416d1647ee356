"""Measurements: FID / FD, k-NN, token ablation, redundancy, noise robustness, FLOPs, throughput."""
