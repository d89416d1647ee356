"""The samplers: Euler and Heun against exact solutions, the time points each one evaluates,
classifier-free and AutoGuidance on constant fields, and `flatdino sample --sampler heun
--guide-dit` end to end, refusals included."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.models.flow import euler_sample, flow_sample, sample_noise, shift_time
from flatdino.pipeline.errors import FlatDinoError
from flatdino.sampling.sample import SampleConfig, class_labels, run_key, sample

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
NULL = 10  # the null class of the toy models


def _grid(steps: int, kappa: float) -> list[float]:
    return shift_time(torch.linspace(0, 1, steps + 1), kappa).tolist()


def _linear_error(sampler: str, a: float, steps: int, kappa: float) -> float:
    """Relative error at t = 1 on dx/dt = a·x, whose exact solution is x0·exp(a) on any grid."""
    x0 = torch.tensor([[1.0, -0.5, 2.0]])
    out = flow_sample(
        lambda x, t, y: a * x, x0, torch.zeros(1, dtype=torch.long), steps, kappa, sampler=sampler
    )
    exact = x0 * math.exp(a)
    return ((out - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("kappa", [1.0, 3.0])
@pytest.mark.parametrize("a", [1.0, -2.0])
def test_heun_is_second_order_and_euler_first_on_a_linear_ode(a, kappa):
    err = {
        (s, n): _linear_error(s, a, n, kappa) for s in ("euler", "heun") for n in (10, 20, 50, 100)
    }
    for s in ("euler", "heun"):
        assert err[s, 100] < err[s, 50] < err[s, 20] < err[s, 10]  # both converge
    # The observed order between 20 and 100 steps: log(e20 / e100) / log 5.
    order = {s: math.log(err[s, 20] / err[s, 100]) / math.log(5) for s in ("euler", "heun")}
    assert 0.9 < order["euler"] < 1.1, order
    assert 1.8 < order["heun"] < 2.2, order
    for n in (50, 100):
        assert err["heun", n] < err["euler", n] / 5, (n, err)
    # At 10 steps Heun's last (Euler) step dominates when κ = 3: it spans t = 0.75 .. 1.
    assert err["heun", 10] < err["euler", 10] / (5 if kappa == 1.0 else 2), err


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("kappa", [1.0, 3.0])
def test_a_constant_field_is_exact(sampler, kappa):
    x0 = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = flow_sample(
        lambda x, t, y: torch.full_like(x, -1.3),
        x0,
        torch.zeros(3, dtype=torch.long),
        7,
        kappa,
        sampler=sampler,
    )
    torch.testing.assert_close(out, x0 - 1.3)


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_heun_evaluates_each_inner_time_twice_and_never_t_equal_1(steps):
    seen: list[float] = []

    def model(x, t, y):
        assert t.shape == (x.shape[0],)
        seen.append(t[0].item())
        return torch.zeros_like(x)

    x0, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    flow_sample(model, x0, y, steps, 3.0, sampler="heun")
    g = _grid(steps, 3.0)
    # step i < steps - 1: the predictor at t_i, the corrector at t_i+1; the last step: t_N-1 only
    expected = [t for i in range(steps - 1) for t in (g[i], g[i + 1])] + [g[steps - 1]]
    assert len(seen) == 2 * steps - 1
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    assert max(seen) < 1.0
    seen.clear()
    flow_sample(model, x0, y, steps, 3.0, sampler="euler")
    np.testing.assert_allclose(seen, g[:-1], rtol=1e-6)


def _weights(sampler: str, steps: int, kappa: float) -> list[tuple[float, float]]:
    """(time, weight) of every evaluation: the result is x0 + Σ weight·v(time)."""
    g = _grid(steps, kappa)
    dt = [g[i + 1] - g[i] for i in range(steps)]
    if sampler == "euler":
        return [(g[i], dt[i]) for i in range(steps)]
    inner = [(t, dt[i] / 2) for i in range(steps - 1) for t in (g[i], g[i + 1])]
    return inner + [(g[steps - 1], dt[steps - 1])]


C_MAIN = torch.tensor([1.0, 2.0, -0.5])  # per-class constant velocities of the main model
C_WEAK = torch.tensor([0.25, -1.0, 1.5])  # ... and of the weaker guide
C_NULL = -2.0  # the main model's unconditional velocity


class ConstantModel:
    """v(x, t, y) = c[y] for every token, recording the labels it is called with."""

    def __init__(self, c: torch.Tensor, null: float | None = None):
        self.c, self.null, self.labels = c, null, []

    def __call__(self, x, t, y):
        self.labels.append(y.clone())
        v = torch.where(
            y == NULL, torch.tensor(self.null or 0.0), self.c[y.clamp(max=len(self.c) - 1)]
        )
        return v.view(-1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("autoguidance", [False, True])
def test_guidance_on_constant_fields_follows_each_evaluations_own_time(sampler, autoguidance):
    """Inside the interval v = c_weak + w (c_main - c_weak) (AutoGuidance, both conditional) or
    c_u + w (c_main - c_u) (CFG); outside v = c_main; the result is x0 + Σ weight·v."""
    steps, kappa, w, interval = 8, 3.0, 3.0, (0.3, 0.8)
    main = ConstantModel(C_MAIN, null=C_NULL)
    guide = ConstantModel(C_WEAK) if autoguidance else None
    x0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    out = flow_sample(main, x0, y, steps, kappa, w, interval, NULL, sampler=sampler, guide=guide)
    evals = _weights(sampler, steps, kappa)
    inside = sum(wt for t, wt in evals if interval[0] <= t <= interval[1])
    outside = sum(wt for t, wt in evals if not interval[0] <= t <= interval[1])
    assert 0.2 < inside < 0.8 and inside + outside == pytest.approx(1.0)  # both parts matter
    base = C_WEAK if autoguidance else torch.full((3,), C_NULL)
    expected = x0 + (inside * (base + w * (C_MAIN - base)) + outside * C_MAIN).view(-1, 1, 1)
    torch.testing.assert_close(out, expected)
    n_inside = sum(interval[0] <= t <= interval[1] for t, _ in evals)
    if autoguidance:  # the guide runs only inside, and no model ever sees the null class
        assert len(guide.labels) == n_inside
        assert all(torch.equal(labels, y) for labels in guide.labels + main.labels)
    else:  # CFG: one batch of conditional + unconditional rows inside, one pass outside
        assert sum(len(labels) == 6 for labels in main.labels) == n_inside
        assert len(main.labels) == len(evals)


def _euler_before_heun(model, x0, y, steps, kappa, cfg, cfg_interval, null_class, autocast=None):
    """`euler_sample` as it was before `flow_sample` (kept to check bit-identical results)."""
    grid = shift_time(torch.linspace(0, 1, steps + 1, device=x0.device), kappa)
    times = grid.tolist()
    x = x0.float()
    null = torch.full_like(y, null_class)

    def velocity(x, t, y):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return model(x, t, y).float()

    for i in range(steps):
        t, dt = grid[i], grid[i + 1] - grid[i]
        tb = t.expand(x.shape[0])
        if cfg != 1.0 and cfg_interval[0] < times[i] < cfg_interval[1]:
            both = velocity(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null]))
            v_c, v_u = both.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        else:
            v = velocity(x, tb, y)
        x = x + dt * v
    return x


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_euler_sample_is_flow_sample_euler_bit_for_bit(autocast):
    from flatdino.models.dit import LightningDiT, dit_preset

    torch.manual_seed(0)
    dit = LightningDiT(dit_preset("tiny", tokens=4, latent_dim=3, num_classes=NULL)).eval()
    for p in dit.parameters():  # a zero-initialised head would make every sampler return x0
        p.data.normal_(0, 0.2)
    x0, y = torch.randn(5, 4, 3), torch.arange(5)
    for args in ((7, 3.0, 2.5, (0.3, 1.0), NULL), (4, 1.0, 1.0, (0.0, 1.0), NULL)):
        before = _euler_before_heun(dit, x0, y, *args, autocast=autocast)
        assert not torch.allclose(before, x0, atol=0.1)
        assert torch.equal(euler_sample(dit, x0, y, *args, autocast=autocast), before)
        assert torch.equal(flow_sample(dit, x0, y, *args, autocast, sampler="euler"), before)
        heun = flow_sample(dit, x0, y, *args, autocast, sampler="heun")
        assert not torch.allclose(heun, before, atol=1e-3)


def test_an_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="sampler must be one of euler, heun; got 'rk4'"):
        flow_sample(
            lambda x, t, y: x, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 2, sampler="rk4"
        )
    with pytest.raises(FlatDinoError, match="^--sampler must be one of euler, heun; got 'rk4'$"):
        sample(SampleConfig(dit="", out="", sampler="rk4"))


def test_run_key_holds_the_sampler_and_the_guide_checkpoint(tmp_path, monkeypatch):
    folders = [tmp_path / name for name in ("dit", "vae", "guide", "guide2")]
    for folder in folders:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(folder.name.encode())
    dit, vae, guide, guide2 = folders
    cfg = SampleConfig(dit=str(dit), out=str(tmp_path / "s"), n=4)
    cpu = torch.device("cpu")

    def key(c=cfg, ckpts=(dit, vae)):
        return run_key(c, class_labels(c, 10), None, cpu, list(ckpts))

    assert key(dataclasses.replace(cfg, sampler="heun")) != key()
    guided = dataclasses.replace(cfg, guide_dit=str(guide))
    assert key(guided, (dit, vae, guide)) not in (key(), key(guided, (dit, vae, guide2)))
    monkeypatch.chdir(tmp_path)  # the guide's path as given is not part of the key, its identity is
    assert key(dataclasses.replace(guided, guide_dit="guide"), (dit, vae, Path("guide"))) == key(
        guided, (dit, vae, guide)
    )


def test_a_guide_lifts_the_class_dropout_refusal():
    from flatdino.pipeline.checkpoints import FlowRecord
    from flatdino.sampling.sample import check_guidance

    cfg = SampleConfig(dit="", out="", cfg=2.0)
    flow = FlowRecord(kappa=3.0, class_dropout=0.0)
    with pytest.raises(FlatDinoError, match="without class dropout.*--guide-dit"):
        check_guidance(flow, cfg)
    check_guidance(flow, dataclasses.replace(cfg, guide_dit="weak"))
    check_guidance(flow, dataclasses.replace(cfg, cfg=1.0))


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A tiny DiT run on the digits through the CLI (as tests/test_sample.py's `chain`, without
    the pixel decoder), keeping RUN/steps/0000002 as the weaker model. A large learning rate and
    no EMA, so that 2 and 4 steps give models that differ (the velocity head starts at zero)."""
    from conftest import build_chain

    dit = ("--steps", "4", "--keep-every", "2", "--lr", "1e-2", "--ema-decay", "0")
    return build_chain(tmp_path_factory.mktemp("chain"), invoke, dit, decoder=False)


def _sample_args(chain: Path, out: Path, *extra) -> list[str]:
    return [
        str(a)
        for a in (
            "sample",
            "--dit",
            chain / "dit",
            "--out",
            out,
            "--n",
            "4",
            "--steps",
            "3",
            "--cfg",
            "2.5",
            "--cfg-interval",
            "0.2,1.0",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        )
    ]


def test_sample_with_heun_and_autoguidance_end_to_end(chain, tmp_path):
    from flatdino.pipeline.checkpoints import load_dit

    weak = chain / "dit" / "steps" / "0000002"
    invoke(*_sample_args(chain, tmp_path / "cfg", "--sampler", "heun"))
    invoke(*_sample_args(chain, tmp_path / "auto", "--sampler", "heun", "--guide-dit", weak))
    record = json.loads((tmp_path / "auto" / "sample.json").read_text())
    assert record["sampler"] == record["config"]["sampler"] == "heun"
    assert record["guide"] == str(weak.resolve()) and record["config"]["guide_dit"] == str(weak)
    assert record["checkpoints"][-1] == str(weak.resolve())
    cfg_record = json.loads((tmp_path / "cfg" / "sample.json").read_text())
    assert cfg_record["guide"] is None and cfg_record["key"] != record["key"]
    auto = np.load(tmp_path / "auto" / "latents.npy")
    assert np.abs(auto - np.load(tmp_path / "cfg" / "latents.npy")).mean() > 0.1
    # The same latents as flow_sample with the two EMA models on the same noise.
    dit, flow, norm, _ = load_dit(str(chain / "dit"))
    guide = load_dit(str(weak))[0]
    shape = (dit.cfg.tokens, dit.cfg.latent_dim)
    x0 = torch.from_numpy(np.stack([sample_noise(0, i, shape) for i in range(4)]))
    x1 = flow_sample(
        dit,
        x0,
        torch.arange(4),
        3,
        float(flow.kappa),
        2.5,
        (0.2, 1.0),
        dit.null_class,
        sampler="heun",
        guide=guide,
    )
    np.testing.assert_allclose(auto, norm.denormalize(x1).numpy(), rtol=1e-5, atol=1e-5)


def _copy_dit(src: Path, dst: Path, **config) -> Path:
    """A copy of a DiT checkpoint; with `config`: another architecture, freshly initialised."""
    from safetensors.torch import save_file

    from flatdino.models.dit import DiTConfig, LightningDiT

    shutil.copytree(src, dst)
    if config:
        cfg = dataclasses.replace(
            DiTConfig(**json.loads((src / "config.json").read_text())), **config
        )
        state = LightningDiT(cfg).state_dict()
        for name in ("model", "ema"):
            save_file(state, dst / f"{name}.safetensors")
        (dst / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return dst


def test_a_guide_for_other_latents_or_shapes_is_refused_in_one_line(chain, tmp_path):
    weak = chain / "dit" / "steps" / "0000002"
    other = _copy_dit(weak, tmp_path / "other-latents")
    flow = json.loads((other / "flow.json").read_text())
    flow["latents_fingerprint"]["vae_sha256"] = "0" * 64  # as if encoded by another VAE
    (other / "flow.json").write_text(json.dumps(flow))
    cases = [
        (other, "was not trained on the latents --dit was (their flow.json's latents_fingerprint"),
        (
            _copy_dit(weak, tmp_path / "classes", num_classes=3),
            "(tokens, latent_dim, classes, cls_dim) = (8, 16, 3, 0)",
        ),
        (
            _copy_dit(weak, tmp_path / "tokens", tokens=4),
            "(tokens, latent_dim, classes, cls_dim) = (4, 16, 10, 0)",
        ),
        (tmp_path, "--guide-dit"),  # no checkpoint at all
    ]
    for guide, message in cases:
        result = runner.invoke(app, _sample_args(chain, tmp_path / "s", "--guide-dit", guide))
        assert result.exit_code == 1, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, (
            result.stderr
        )
        assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
