"""`flatdino eval ablate`: what each latent token encodes, spatially (paper Figure 6).

For every image (view 0) the VAE's reconstruction from mu is compared with the reconstruction
after zeroing one latent token: the L2 norm of the change of each reconstructed patch feature,
averaged over the images, gives one 16×16 heatmap per token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..pipeline.checkpoints import load_vae, resolve_vae
from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore


@torch.no_grad()
def token_ablation(vae, batches) -> np.ndarray:
    """(T, P) mean L2 change of each reconstructed patch when token t of mu is zeroed.

    `vae` needs `encode(x) -> (mu, logvar)` and `decode(z) -> (B, P, C)`; `batches` yields (B, P, C).
    """
    total, count = None, 0
    for x in batches:
        mu = vae.encode(x)[0]  # (B, T, d)
        base = vae.decode(mu)  # (B, P, C)
        rows = []
        for t in range(mu.shape[1]):
            z = mu.clone()
            z[:, t] = 0
            rows.append((vae.decode(z) - base).float().norm(dim=-1).sum(0))  # (P,)
        batch = torch.stack(rows)  # (T, P)
        total = batch if total is None else total + batch
        count += len(x)
    if total is None:
        raise FlatDinoError("no valid image to ablate")
    return (total / count).cpu().numpy()


def ablate(
    features: str, vae_path: str, images: int = 256, batch_size: int = 32, device: str = "cpu"
) -> np.ndarray:
    """Token ablation of the VAE at `vae_path` on the first `images` valid images of a store."""
    vae, _ = load_vae(resolve_vae(vae_path))
    store = FeatureStore(features)
    _, _, p, c = store.features.shape
    if (p, c) != (vae.cfg.num_patches, vae.cfg.in_dim):
        raise FlatDinoError(
            f"VAE {vae_path!r} expects ({vae.cfg.num_patches}, {vae.cfg.in_dim}) features, the "
            f"store holds ({p}, {c}); use the VAE trained on this backbone's features"
        )
    vae = vae.to(device)
    rows = store.valid_rows(images)

    def batches():
        for i in range(0, len(rows), batch_size):
            block = store.features.get_orthogonal_selection((rows[i : i + batch_size], 0))
            yield torch.from_numpy(block).to(device).float()  # (B, P, C)

    return token_ablation(vae, batches())


def plot_ablation(heat: np.ndarray, path: str) -> None:
    """One 16×16 heatmap per token, in a near-square grid (the paper's Figure 6)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    tokens, side = heat.shape[0], math.isqrt(heat.shape[1])
    cols = math.ceil(math.sqrt(tokens))
    rows = math.ceil(tokens / cols)
    fig = Figure(figsize=(1.4 * cols, 1.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for t, ax in enumerate(axes.flat):
        ax.axis("off")
        if t < tokens:
            ax.imshow(heat[t].reshape(side, side), cmap="viridis")
            ax.set_title(f"token {t}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
