"""`flatdino eval noise`: robustness of the latent space to noise (paper Appendix B).

Gaussian noise of standard deviation σ is added either to the FlatDINO latents (mu, decoded by the
VAE) or directly to the DINOv2 patch features, for σ on a grid in [0, 1]. Both are measured as the
relative feature error ‖x̃ − x‖² / ‖x‖² against the clean features x of view 0, and, when a pixel
decoder is given, as the PSNR of its images against the true image crops.
"""

from __future__ import annotations

import numpy as np
import torch

from ..pipeline.checkpoints import load_pixel_decoder, load_vae, resolve_vae
from ..pipeline.feature_store import FeatureStore
from ..pipeline.targets import TargetImages


@torch.no_grad()
def noise_curves(
    vae, x: torch.Tensor, sigmas: list[float], decoder=None, images=None, seed: int = 0
) -> dict[str, list[float]]:
    """Per σ: relative feature error through the latents and on the features (and PSNRs).

    `vae` needs encode/decode; x (B, P, C) clean features; images (B, 3, H, W) in [0, 1].
    """
    g = torch.Generator(device=x.device).manual_seed(seed)
    mu = vae.encode(x)[0]
    power = x.pow(2).sum()
    curves: dict[str, list[float]] = {
        "sigma": list(sigmas),
        "latent_rel_err": [],
        "feature_rel_err": [],
    }
    if decoder is not None:
        curves.update(latent_psnr=[], feature_psnr=[])
    for s in sigmas:
        through_latents = vae.decode(mu + s * torch.randn(mu.shape, generator=g, device=x.device))
        on_features = x + s * torch.randn(x.shape, generator=g, device=x.device)
        for name, xt in (("latent", through_latents), ("feature", on_features)):
            curves[f"{name}_rel_err"].append(((xt - x).pow(2).sum() / power).item())
            if decoder is not None:
                mse = (decoder(xt).clamp(0, 1) - images).pow(2).flatten(1).mean(1)  # (B,)
                curves[f"{name}_psnr"].append(
                    (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()
                )
    return curves


def noise_eval(
    features: str,
    vae_path: str,
    decoder_path: str | None = None,
    images: int = 64,
    steps: int = 11,
    device: str = "cpu",
) -> dict:
    """The curves on the first `images` valid images of a feature store."""
    store = FeatureStore(features)
    vae = load_vae(resolve_vae(vae_path))[0].to(device)
    rows = store.valid_rows(images)
    x = torch.from_numpy(store.features.get_orthogonal_selection((rows, 0))).float().to(device)
    decoder = target = None
    if decoder_path:
        decoder = load_pixel_decoder(decoder_path)[0].to(device)
        target = TargetImages(store, 4).batch(rows, np.zeros(len(rows), int)).to(device)
    sigmas = np.linspace(0.0, 1.0, steps).round(4).tolist()
    curves = noise_curves(vae, x, sigmas, decoder, target)
    return {
        "features": features,
        "vae": vae_path,
        "decoder": decoder_path,
        "images": int(len(rows)),
        **curves,
    }


def plot_noise(result: dict, path: str) -> None:
    """Feature error (and PSNR) against σ, latents vs features."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    panels = 2 if "latent_psnr" in result else 1
    fig = Figure(figsize=(4.5 * panels, 3.5))
    axes = fig.subplots(1, panels, squeeze=False)
    keys = [("rel_err", "relative feature error")] + (
        [("psnr", "PSNR (dB)")] if panels == 2 else []
    )
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        ax.plot(
            result["sigma"], result[f"latent_{key}"], marker="o", label="noise on FlatDINO latents"
        )
        ax.plot(
            result["sigma"], result[f"feature_{key}"], marker="s", label="noise on DINOv2 features"
        )
        ax.set_xlabel("noise sigma")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
