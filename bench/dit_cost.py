"""Cost of one DiT training step with the encoders in or out of the loop (paper Appendix H, Table 9).

One run, side by side, real architectures with random weights, the same batch for all four:
  (a) cached latents: a DiT step (forward + backward + AdamW) on (B, 32, 128) FlatDINO latents
      read from memory, which is what `flatdino train-dit` does;
  (b) the FlatDINO encoder run online on cached DINOv2 features, then (a);
  (c) DINOv2 ViT-B/14 and the FlatDINO encoder both run online on images, then (a): the paper's
      setting, the one its FLOP accounting charges 49.4 GFLOPs of encoding for;
  (d) a DiT of the same width and depth on the 256 DINOv2 tokens (768 dims), with DINOv2 run
      online on images: the RAE setting.
The paper's FLOP count predicts (d)/(c) ~4.1x for dit-xl; caching, (d)/(a), should beat it clearly
(FLOPs alone: 378.6 / 42.9 = 8.8x). Every encoder runs frozen, without gradients, as in training.

The parts are timed apart (encoders, DiT forward + backward, optimiser update) and the four
settings are reported per training sample, the update shared by a training batch of 1024 as in the
paper: at a small benchmark batch, one AdamW update over 675M parameters would dominate every
setting alike, a cost that a batch of 1024 makes negligible per sample.

    python bench/dit_cost.py [--preset dit-xl] [--batch 4] [--repeats 2] [--device cpu|cuda]
                             [--dtype fp32|bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from flatdino.models.dinov2 import BACKBONES, DinoPatchFeatures, build_vit
from flatdino.models.dit import LightningDiT, dit_preset
from flatdino.models.flow import flow_loss
from flatdino.models.vae import FlatDinoVAE, vae_preset
from flatdino.trainers.optim import param_groups


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def dit_parts(preset: str, tokens: int, dim: int, device: torch.device, autocast):
    """A DiT with its AdamW: (forward + backward on a batch, the optimiser update), timed apart."""
    model = LightningDiT(dit_preset(preset, tokens=tokens, latent_dim=dim)).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-4, betas=(0.9, 0.95))

    def forward_backward(x1: torch.Tensor, y: torch.Tensor) -> None:
        with autocast():
            loss = flow_loss(model, x1, y, null_class=model.null_class)
        loss.backward()

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: every update does full work

    return model, forward_backward, update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dit-xl")
    parser.add_argument("--vae", default="flatdino-32x128")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=1024, help="batch sharing one update")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device, B = torch.device(args.device), args.batch

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    torch.manual_seed(0)
    dino = DinoPatchFeatures(build_vit(BACKBONES["dinov2-vitb14-reg"])).to(device).eval()
    vae_cfg = vae_preset(args.vae, in_dim=768, num_patches=256)
    encoder = FlatDinoVAE(vae_cfg).encoder.to(device).eval()
    images = torch.randn(B, 3, 224, 224, device=device)
    features = torch.randn(B, 256, 768, device=device)
    latents = torch.randn(B, vae_cfg.tokens, vae_cfg.latent_dim, device=device)
    y = torch.randint(0, 10, (B,), device=device)  # a class every preset has

    @torch.no_grad()
    def encode_features(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return encoder(x)[0].float()  # mu (B, T, d)

    @torch.no_grad()
    def encode_images(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return dino(x).float()  # (B, 256, 768)

    t: dict[str, float] = {}  # seconds per call, batch B
    t["dinov2"] = timed(lambda: encode_images(images), args.repeats, device)
    t["flatdino_encoder"] = timed(lambda: encode_features(features), args.repeats, device)
    dit, fwd_bwd, update = dit_parts(
        args.preset, vae_cfg.tokens, vae_cfg.latent_dim, device, autocast
    )
    params32 = sum(p.numel() for p in dit.parameters())
    t["dit_fwd_bwd_32"] = timed(lambda: fwd_bwd(latents, y), args.repeats, device)
    t["dit_update_32"] = timed(update, args.repeats, device)
    del dit, fwd_bwd, update
    dit, fwd_bwd, update = dit_parts(args.preset, 256, 768, device, autocast)
    params256 = sum(p.numel() for p in dit.parameters())
    t["dit_fwd_bwd_256"] = timed(lambda: fwd_bwd(features, y), args.repeats, device)
    t["dit_update_256"] = timed(update, args.repeats, device)

    # Seconds per training sample, the optimiser update shared by a --train-batch batch.
    per = {k: v / B for k, v in t.items() if "update" not in k}
    u32, u256 = t["dit_update_32"] / args.train_batch, t["dit_update_256"] / args.train_batch
    settings = {
        "a_cached_latents": per["dit_fwd_bwd_32"] + u32,
        "b_online_flatdino_encoder": per["flatdino_encoder"] + per["dit_fwd_bwd_32"] + u32,
        "c_online_dinov2_and_encoder": per["dinov2"]
        + per["flatdino_encoder"]
        + per["dit_fwd_bwd_32"]
        + u32,
        "d_rae_256_tokens_online_dinov2": per["dinov2"] + per["dit_fwd_bwd_256"] + u256,
    }
    a, b, c, d = settings.values()
    ratios = {"b/a": b / a, "c/a": c / a, "d/c": d / c, "d/a": d / a}
    shape = f"{vae_cfg.tokens}x{vae_cfg.latent_dim}"
    print(
        f"{args.preset} ({params32 / 1e6:.1f}M on {shape}, {params256 / 1e6:.1f}M on 256x768), "
        f"VAE {args.vae}, batch {B}, {args.device} {args.dtype}, median of {args.repeats}"
    )
    for name, seconds in t.items():
        print(f"  {name:20s} {seconds:8.3f} s per call")
    print(f"per training sample (update shared by a batch of {args.train_batch}):")
    for name, seconds in settings.items():
        print(f"  {name:32s} {seconds * 1e3:9.1f} ms/sample  {1 / seconds:8.2f} samples/s")
    print("  ratios: " + "  ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    print("  paper (FLOPs, Table 9): d/c = 4.1x; d/a = 378.6 / 42.9 = 8.8x")
    results = {"seconds_per_call": t, "seconds_per_sample": settings}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
