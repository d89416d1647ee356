"""FLOPs of the paper's Appendix H, and of this project's modules, side by side.

The formula (paper Eq. 11): one multiply-add is one FLOP, per sample; a transformer layer with a
parameter-matched SwiGLU (hidden 8D/3) costs 12·S·D² (projections and FFN) + 2·S²·D (attention
scores and weighted values). A training step costs 3× the forward pass; encoding runs DINOv2
ViT-B (S = 261: 256 patches, CLS and 4 registers) and, for FlatDINO, its ViT-B encoder (S = 288:
256 patches and 32 latent tokens). The measured side counts the real modules' forward passes with
torch.utils.flop_counter on the meta device (no memory, no compute); it also sees what the formula
leaves out (adaLN modulation, embeddings, the output layer), so divergences are visible. DiT-DH
is where they are largest: its head is modulated per token (an adaLN of S·H·6H per head block and
S·H·2H in the final layer, where a DiT's adaLN costs D·6D per sample), about 1.9 GFLOPs of the
dit-dh-xl forward pass on 32 tokens that Table 7 does not count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.dinov2 import BACKBONES, DinoPatchFeatures, build_vit
from ..models.dit_dh import build_generator, generator_preset
from ..models.vae import FlatDinoVAE, vae_preset

# (width, layers) of each stage of the paper's generators (Table 7); DH-XL adds a 2-layer head.
PAPER_MODELS: dict[str, list[tuple[int, int]]] = {
    "DiT-L": [(1024, 24)],
    "DiT-XL": [(1152, 28)],
    "DiT-DH-XL": [(1152, 28), (2048, 2)],
}
PAPER_LATENTS = {"RAE": 256, "FlatDINO": 32}  # sequence lengths
DINOV2_VITB = (768, 12, 261)  # width, layers, sequence: 256 patches + CLS + 4 registers
FLATDINO_ENCODER = (768, 12, 288)  # 256 DINOv2 patches + 32 latent tokens


def layer_flops(seq: int, dim: int) -> tuple[float, float]:
    """(linear 12·S·D², attention 2·S²·D) of one layer, per sample (Eq. 11)."""
    return 12.0 * seq * dim**2, 2.0 * seq**2 * dim


def forward_flops(seq: int, stages: list[tuple[int, int]]) -> float:
    """Forward FLOPs of a stack of layers, per sample."""
    return sum(layers * sum(layer_flops(seq, dim)) for dim, layers in stages)


def encoder_flops(spec: tuple[int, int, int]) -> float:
    dim, layers, seq = spec
    return forward_flops(seq, [(dim, layers)])


@dataclass
class PaperRow:
    """One (model, latent) row of Tables 7-9, in GFLOPs per sample."""

    model: str
    latent: str
    seq: int
    forward: float
    train: float  # forward + backward = 3x forward (Table 8)
    encoding: float  # DINOv2, plus the FlatDINO encoder for FlatDINO latents (Table 9)
    total: float
    reduction: float | None = None  # RAE total / FlatDINO total, on the FlatDINO row


def paper_table() -> list[PaperRow]:
    """Tables 7-9 recomputed from the formula."""
    rows = []
    for model, stages in PAPER_MODELS.items():
        pair = []
        for latent, seq in PAPER_LATENTS.items():
            fwd = forward_flops(seq, stages) / 1e9
            enc = encoder_flops(DINOV2_VITB) / 1e9
            if latent == "FlatDINO":
                enc += encoder_flops(FLATDINO_ENCODER) / 1e9
            pair.append(PaperRow(model, latent, seq, fwd, 3 * fwd, enc, enc + 3 * fwd))
        pair[1].reduction = pair[0].total / pair[1].total
        rows += pair
    return rows


def count_forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """Multiply-adds of one forward pass, counted by torch's FlopCounterMode (which counts 2 per
    multiply-add). Use the meta device: free, and attention is counted there (CPU's fused SDPA
    kernel has no FLOP formula in torch, so it would be missed)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / 2


def project_table() -> list[dict]:
    """This project's generator presets on both latent shapes, and the encoders, measured on
    meta."""
    rows = []
    with torch.device("meta"):
        for preset in ("dit-l", "dit-xl", "dit-dh-xl"):
            for latent, (seq, dim) in {"RAE": (256, 768), "FlatDINO": (32, 128)}.items():
                model = build_generator(generator_preset(preset, tokens=seq, latent_dim=dim))
                x, t, y = torch.empty(1, seq, dim), torch.empty(1), torch.zeros(1, dtype=torch.long)
                rows.append(
                    {
                        "module": preset,
                        "latent": latent,
                        "seq": seq,
                        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                        "forward_G": count_forward_flops(model, x, t, y) / 1e9,
                    }
                )
        dino = DinoPatchFeatures(build_vit(BACKBONES["dinov2-vitb14-reg"]))
        encoder = FlatDinoVAE(vae_preset("flatdino-32x128", in_dim=768, num_patches=256)).encoder
        for name, module, x in (
            ("DINOv2 ViT-B/14", dino, torch.empty(1, 3, 224, 224)),
            ("FlatDINO encoder", encoder, torch.empty(1, 256, 768)),
        ):
            rows.append(
                {
                    "module": name,
                    "latent": "-",
                    "seq": None,
                    "params_M": sum(p.numel() for p in module.parameters()) / 1e6,
                    "forward_G": count_forward_flops(module, x) / 1e9,
                }
            )
    return rows
