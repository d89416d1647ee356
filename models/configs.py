"""The model configs and their preset registries, without torch: the CLI lists the presets (and
`flatdino --help` answers) without importing a network. Each config is saved as config.json and
rebuilds its model (models/vae.py, dit.py, pixel_decoder.py, dinov2.py, which re-export these)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

VAE_INITS = ("official", "toy")
# Guidance only while t is strictly inside this interval: the paper's and the official sampler's
# default (decoder/sampling.py, cfg_interval_min 0.225), `flatdino sample --cfg-interval`.
CFG_INTERVAL = (0.225, 1.0)
DIT_INITS = ("official", "xavier")


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: timm ViT arguments and where pretrained weights come from."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str | None = None  # hub weights via timm; None: seeded random init (tiny)
    patch_size: int = 14
    reg_tokens: int = 4
    img_size: int = 224  # 16x16 patches; pretrained 37x37 position grids are resampled on load
    init_seed: int = 0  # seeds the random init of presets without pretrained weights


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2-vitb14-reg": BackboneSpec(
        "dinov2-vitb14-reg", 768, 12, 12, timm_name="vit_base_patch14_reg4_dinov2"
    ),
    # Same structure (patch 14, 4 registers, LayerScale, final norm) at toy size, random weights:
    # for tests and the offline demo.
    "tiny": BackboneSpec("tiny", 64, 2, 2),
}


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of one FlatDINO VAE (saved as config.json; rebuilds the model)."""

    in_dim: int = 768  # C: feature channels of the store
    num_patches: int = 256  # P: patches per image
    tokens: int = 32  # T: latent tokens
    latent_dim: int = 128  # d: channels per latent token
    enc_dim: int = 768  # encoder width (ViT-B)
    enc_depth: int = 12
    enc_heads: int = 12
    dec_dim: int = 1024  # decoder width (ViT-L)
    dec_depth: int = 24
    dec_heads: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio · width (the official code: 4·D)
    # "official": truncated normal 0.02 for every Linear, token and position embedding (the
    # official code). "toy": the same tensors started so that a 64-wide model learns within
    # minutes (sin-cos queries, unit-scale latent path, logvar -5); see `FlatDinoVAE._toy_init`.
    init: str = "official"

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        if self.init not in VAE_INITS:
            raise ValueError(
                f"VAEConfig.init must be one of {', '.join(VAE_INITS)}; got {self.init!r}"
            )


VAE_PRESETS: dict[str, VAEConfig] = {
    "flatdino-32x128": VAEConfig(),  # the paper's model
    "flatdino-32x64": VAEConfig(latent_dim=64),
    "tiny": VAEConfig(
        tokens=8,
        latent_dim=16,
        enc_dim=64,
        enc_depth=2,
        enc_heads=2,
        dec_dim=64,
        dec_depth=2,
        dec_heads=2,
        init="toy",
    ),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """A registered preset with fields overridden (e.g. tokens, latent_dim, in_dim)."""
    return replace(VAE_PRESETS[name], **overrides)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one LightningDiT (saved as config.json; rebuilds the model)."""

    tokens: int = 32  # T: latent tokens (read from the latents store)
    latent_dim: int = 128  # d: channels per token (read from the latents store)
    dim: int = 1152  # D: width
    depth: int = 28
    heads: int = 16
    mlp_hidden_ratio: float = 8 / 3  # SwiGLU hidden = round(ratio · D) (3072 for D = 1152)
    num_classes: int = 1000  # class index num_classes is the null (unconditional) class
    rope_base: float = 10000.0
    # "official": the official `LightningDiT.__init__` (truncated normal 0.02 for the block,
    # time and class layers, Xavier for the token embedding). "xavier": DiT's init (Xavier for
    # every Linear, N(0, 0.02) embeddings), the one the 64-wide demo model was tuned with.
    # Both zero the adaLN and output layers (adaLN-Zero).
    init: str = "official"
    # C of the DINOv2 CLS token generated beside the latents (the official `in_cls_dim`): it
    # enters as an extra first token and its velocity is read back; 0: latents only.
    cls_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_hidden_ratio * self.dim)

    def __post_init__(self):
        if self.init not in DIT_INITS:
            raise ValueError(
                f"DiTConfig.init must be one of {', '.join(DIT_INITS)}; got {self.init!r}"
            )


DIT_PRESETS: dict[str, DiTConfig] = {
    "dit-xl": DiTConfig(dim=1152, depth=28, heads=16),  # the paper's generator
    "dit-l": DiTConfig(dim=1024, depth=24, heads=16),
    "dit-b": DiTConfig(dim=768, depth=12, heads=12),
    "dit-s": DiTConfig(dim=384, depth=12, heads=6),
    "tiny": DiTConfig(dim=64, depth=2, heads=2, num_classes=10, init="xavier"),
}


def dit_preset(name: str, **overrides) -> DiTConfig:
    return replace(DIT_PRESETS[name], **overrides)


@dataclass(frozen=True)
class DiTDHConfig:
    """Architecture of one DiT-DH, a DiT encoder with a wide decoupled head (the official
    `DiTDH` on flat latents, decoder/dit_dh.py; saved as config.json; rebuilds the model)."""

    kind: str = "dit_dh"  # tells a config.json of this generator from a LightningDiT's
    tokens: int = 32  # T: latent tokens (read from the latents store)
    latent_dim: int = 128  # d: channels per token (read from the latents store)
    dim: int = 1152  # D: encoder width (the official encoder_dim)
    depth: int = 28  # encoder blocks
    heads: int = 16
    dh_dim: int = 2048  # width of the decoupled head (decoder_dim)
    dh_depth: int = 2  # head blocks (decoder_depth)
    dh_heads: int = 16
    mlp_hidden_ratio: float = 8 / 3  # SwiGLU hidden = int(ratio · width) in both parts (5461)
    num_classes: int = 1000  # class index num_classes is the null (unconditional) class
    rope_base: float = 10000.0
    use_rope: bool = True  # 1-D RoPE in both parts (the official use_rope)
    registers: int = 0  # learned tokens prepended in both parts (num_registers); no RoPE
    cls_dim: int = 0  # C of the CLS token generated beside the latents (in_cls_dim); 0: none

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_hidden_ratio)

    @property
    def dh_mlp_hidden(self) -> int:
        return int(self.dh_dim * self.mlp_hidden_ratio)

    def __post_init__(self):
        if self.kind != "dit_dh":
            raise ValueError(f"DiTDHConfig.kind must be 'dit_dh'; got {self.kind!r}")
        if self.registers and self.use_rope:
            raise ValueError(
                "DiT-DH registers need use_rope=False: the official flat RoPE table has T rows"
            )


DIT_DH_PRESETS: dict[str, DiTDHConfig] = {
    "dit-dh-xl": DiTDHConfig(),  # the paper's Table 7 DiT^DH-XL: DiT-XL + a 2 x 2048 head
    "dit-dh-tiny": DiTDHConfig(
        dim=64, depth=2, heads=2, dh_dim=96, dh_depth=1, dh_heads=2, num_classes=10
    ),
}
# Every generator `train-dit --preset` builds, LightningDiT and DiT-DH.
GENERATOR_PRESETS: dict[str, DiTConfig | DiTDHConfig] = {**DIT_PRESETS, **DIT_DH_PRESETS}


def generator_preset(name: str, **overrides) -> DiTConfig | DiTDHConfig:
    return replace(GENERATOR_PRESETS[name], **overrides)


def generator_config(**fields) -> DiTConfig | DiTDHConfig:
    """The config of a generator's config.json: `kind` dit_dh is a DiT-DH, none a LightningDiT."""
    return DiTDHConfig(**fields) if fields.get("kind") == "dit_dh" else DiTConfig(**fields)


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Architecture of one pixel decoder (saved as config.json; rebuilds the model)."""

    in_dim: int = 768  # C: DINOv2 feature width
    num_patches: int = 256  # P: a 16x16 grid of patch features
    dim: int = 1152  # decoder width
    depth: int = 28
    heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 16  # output pixels per patch side: 16 x 16 grid -> 256 x 256 images
    channels: int = 3
    eps: float = 1e-12  # LayerNorm eps of RAE's ViT-MAE layers

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_size(self) -> int:
        return self.patch_size * math.isqrt(self.num_patches)


# RAE's configs/decoder/{ViTXL,ViTL,ViTB}/config.json; rae-vitxl is the published decoder.
PIXEL_DECODER_PRESETS: dict[str, PixelDecoderConfig] = {
    "rae-vitxl": PixelDecoderConfig(dim=1152, depth=28, heads=16, mlp_dim=4096),
    "rae-vitl": PixelDecoderConfig(dim=1024, depth=24, heads=16, mlp_dim=4096),
    "rae-vitb": PixelDecoderConfig(dim=768, depth=12, heads=12, mlp_dim=3072),
    "tiny": PixelDecoderConfig(dim=128, depth=2, heads=4, mlp_dim=256),
}


def pixel_decoder_preset(name: str, **overrides) -> PixelDecoderConfig:
    return replace(PIXEL_DECODER_PRESETS[name], **overrides)


# -- parameter counts from the configs alone (what --help lists; tests/test_options.py checks
# them against the built modules on the meta device) ----------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _swiglu(dim: int, hidden: int) -> int:
    """timm's SwiGLU: two gated input projections and an output projection, all with bias."""
    return 2 * _linear(dim, hidden) + _linear(hidden, dim)


def _vae_block(dim: int, heads: int, mlp_ratio: float) -> int:
    """A timm Block as models/vae.py builds it: two LayerNorms, qkv and proj with bias, a
    bias-free QK LayerNorm pair over the head dim, SwiGLU."""
    attn = _linear(dim, 3 * dim) + 2 * (dim // heads) + _linear(dim, dim)
    return 4 * dim + attn + _swiglu(dim, int(dim * mlp_ratio))


def _proj(n_in: int, n_out: int) -> int:
    return n_in * n_out if n_in != n_out else 0  # models/vae.py `_proj`: none at equal widths


def vae_parameters(cfg: VAEConfig) -> dict[str, int]:
    """Encoder, decoder and total parameters of a FlatDINO VAE."""
    enc = (
        _proj(cfg.in_dim, cfg.enc_dim)
        + cfg.tokens * cfg.enc_dim
        + cfg.enc_depth * _vae_block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio)
        + 2 * cfg.enc_dim
        + _proj(cfg.enc_dim, 2 * cfg.latent_dim)
    )
    dec = (
        _proj(cfg.latent_dim, cfg.dec_dim)
        + (cfg.tokens + cfg.num_patches) * cfg.dec_dim
        + cfg.dec_depth * _vae_block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio)
        + 2 * cfg.dec_dim
        + _proj(cfg.dec_dim, cfg.in_dim)
    )
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def dit_parameters(cfg: DiTConfig) -> int:
    """Parameters of a LightningDiT (the Fourier frequencies are a buffer, not counted)."""
    D = cfg.dim
    block = 2 * D + _linear(D, 3 * D) + _linear(D, D) + _swiglu(D, cfg.mlp_hidden)
    block += _linear(D, 6 * D)  # adaLN
    embed = _linear(cfg.latent_dim, D) + _linear(2 * 256, D) + _linear(D, D)  # tokens, time
    embed += (cfg.num_classes + 1) * D  # classes + the null class
    head = D + _linear(D, 2 * D) + _linear(D, cfg.latent_dim)  # final norm, adaLN, output
    cls = _linear(cfg.cls_dim, D) + _linear(D, cfg.cls_dim) if cfg.cls_dim else 0  # in and out
    return embed + cfg.depth * block + head + cls


def dit_dh_parameters(cfg: DiTDHConfig) -> int:
    """Parameters of a DiT-DH: encoder, head and the learned positions and registers."""
    D, H = cfg.dim, cfg.dh_dim

    def block(w: int, hidden: int) -> int:
        return 2 * w + _linear(w, 3 * w) + _linear(w, w) + _swiglu(w, hidden) + _linear(w, 6 * w)

    embed = _linear(cfg.latent_dim, D) + _linear(cfg.latent_dim, H) + cfg.tokens * D
    embed += _linear(2 * 256, D) + _linear(D, D) + (cfg.num_classes + 1) * D
    embed += cfg.registers * (D + H) + (_linear(D, H) if D != H else 0)
    blocks = cfg.depth * block(D, cfg.mlp_hidden) + cfg.dh_depth * block(H, cfg.dh_mlp_hidden)
    cls = _linear(cfg.cls_dim, D) + _linear(H, cfg.cls_dim) if cfg.cls_dim else 0  # in and out
    return embed + blocks + H + _linear(H, 2 * H) + _linear(H, cfg.latent_dim) + cls


def generator_parameters(cfg: DiTConfig | DiTDHConfig) -> int:
    return dit_dh_parameters(cfg) if isinstance(cfg, DiTDHConfig) else dit_parameters(cfg)


def pixel_decoder_parameters(cfg: PixelDecoderConfig) -> int:
    """Parameters of a pixel decoder, the frozen position table included."""
    D = cfg.dim
    layer = 4 * _linear(D, D) + _linear(D, cfg.mlp_dim) + _linear(cfg.mlp_dim, D) + 4 * D
    embed = _linear(cfg.in_dim, D) + (cfg.num_patches + 1) * D + D  # positions, CLS token
    head = 2 * D + _linear(D, cfg.patch_size**2 * cfg.channels)
    return embed + cfg.depth * layer + head
