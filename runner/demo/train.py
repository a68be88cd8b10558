"""Train the embedded demo model: STDiT3 in pixel space plus its small text encoder, on the
procedural captioned clips of `runner.demo.data`, with Open-Sora 1.2's rectified-flow objective.

    python -m runner.demo.train                       # the shipped recipe -> runs/train_demo
    python -m runner.demo.ship runs/train_demo        # once finished: install it as assets/demo
    python -m runner.demo.train steps=200 output_dir=/tmp/demo max_minutes=5

The checkpoint (EMA weights, safetensors + config.json) is written every `save_every` steps and at
the end, atomically, so an interrupted run still leaves a usable model; `resume=true` continues
from the training state kept next to it (with the same `steps`: the lr decay depends on it).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from models.stdit3 import STDiT3Config, build_stdit3
from models.text_tiny import TinyTextConfig, TinyTextEncoder, WordTokenizer
from runner.config import CONF_DIR, UserError
from runner.demo import data as demo_data
from runner.demo.evaluate import caption_response, demo_predict_x0
from runner.demo.ship import DEFAULT_RUN, check_output_dir
from runner.families.demo import DemoPipeline, save_demo_dir
from runner.sampler import shift_timestep


@dataclass
class DemoArch:
    depth: int = 4
    hidden_size: int = 96
    num_heads: int = 4
    patch_size: list[int] = field(default_factory=lambda: [1, 4, 4])
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4
    max_length: int = 16
    # Frame-index embedding (see STDiT3Config): RoPE-only temporal attention sees frame offsets, not
    # which frame is early, and "moves left" needs that (README, "The demo model").
    temporal_pos_embed: bool = True


@dataclass
class TrainConfig:
    arch: DemoArch = field(default_factory=DemoArch)
    steps: int = 5000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    decay_steps: int = 1000  # linear decay of the lr to 0 over the last decay_steps steps (0: constant)
    ema_decay: float = 0.998
    cfg_dropout: float = 0.1  # probability of training on the null caption (for CFG)
    # Timestep shift t' = r t / (1 + (r - 1) t) of the logit-normal t (Open-Sora's transform with a
    # fixed ratio): pixels are redundant, so layout and motion are decided at high noise and need
    # samples there. Ratio t_shift[i] applies from step t_shift_from[i] on (1 before the first).
    # The shipped run: 3 throughout (unshifted, an earlier run's layout stayed patch-wise noise).
    t_shift: list[float] = field(default_factory=lambda: [3.0])
    t_shift_from: list[int] = field(default_factory=lambda: [0])
    # High-noise phase: for steps < t_uniform_until every t ~ U[t_uniform_min, 1], from then on a
    # t_uniform_share of each batch (the rest as above). The caption decides the layout only there.
    # The shipped run: all of the first 1500 steps there, then half of each batch.
    t_uniform_until: int = 1500
    t_uniform_min: float = 0.9
    t_uniform_share: float = 0.5
    # demo_data.STARTS: where a moving shape starts on its axis. "edge" (the shipped run): at the
    # edge it moves away from, so the direction word also says where the shape starts.
    data_start: str = "edge"
    num_frames: int = 8
    size: int = 32
    seed: int = 0
    # Never the shipped assets/demo (refused): `python -m runner.demo.ship` installs a finished run.
    output_dir: str = DEFAULT_RUN
    log_every: int = 50
    save_every: int = 200
    max_minutes: float = 0.0  # stop (and save) after this many minutes; 0 = no limit
    resume: bool = False
    progress: bool = True


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce."""
    tok = WordTokenizer([])
    words = set()
    for colour, shape, motion in demo_data._ALL_COMBOS:
        for bg in demo_data.BACKGROUNDS:
            words.update(tok.words(demo_data.make_caption(dict(colour=colour, shape=shape, motion=motion, background=bg))))
    return sorted(words)


def build_demo(arch: DemoArch, seed: int) -> DemoPipeline:
    values = 3 * math.prod(arch.patch_size)  # RGB values per token
    if values > arch.hidden_size:
        # The final layer maps hidden_size features to these values, so the velocity of a token lies
        # in a hidden_size-dimensional subspace: the rest of the starting noise is never removed.
        raise ValueError(f"patch {list(arch.patch_size)} holds {values} RGB values per token, more than "
                         f"hidden_size {arch.hidden_size}: the model could not remove all of the noise; "
                         f"use hidden_size >= {values} or a smaller patch")
    dit_cfg = STDiT3Config(
        depth=arch.depth, hidden_size=arch.hidden_size, num_heads=arch.num_heads, patch_size=tuple(arch.patch_size),
        in_channels=3, pred_sigma=False, caption_channels=arch.text_width, model_max_length=arch.max_length,
        temporal_pos_embed=arch.temporal_pos_embed,
    )
    torch.manual_seed(seed)
    tok = WordTokenizer(vocabulary(), arch.max_length)
    text = TinyTextEncoder(TinyTextConfig(arch.text_width, arch.text_depth, arch.text_heads, arch.max_length), len(tok.vocab))
    dit = build_stdit3(dit_cfg, seed=seed)
    return DemoPipeline(dit, text, tok, "trained", random_weights=False)


def shift_ratio(cfg: TrainConfig, step: int) -> float:
    if len(cfg.t_shift) != len(cfg.t_shift_from) or list(cfg.t_shift_from) != sorted(cfg.t_shift_from):
        raise ValueError("t_shift and t_shift_from must have the same length, t_shift_from ascending")
    ratio = 1.0
    for r, start in zip(cfg.t_shift, cfg.t_shift_from):
        if step >= start:
            ratio = r
    return ratio


def sample_t(cfg: TrainConfig, step: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal t shifted by the step's ratio, or U[t_uniform_min, 1] (see TrainConfig)."""
    t = shift_timestep(torch.sigmoid(torch.randn(b, generator=gen)), shift_ratio(cfg, step), num_timesteps=1)
    share = 1.0 if step < cfg.t_uniform_until else cfg.t_uniform_share
    if share > 0:  # no extra draws otherwise, so recipes without the phase are unchanged
        high = cfg.t_uniform_min + (1 - cfg.t_uniform_min) * torch.rand(b, generator=gen)
        t = torch.where(torch.rand(b, generator=gen) < share, high, t)
    return t


def rf_loss(pipe: DemoPipeline, x0: torch.Tensor, captions: list[str], cfg: TrainConfig, gen: torch.Generator,
            step: int = 0):
    """Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts v = x0 - eps; t from `sample_t`."""
    b = x0.shape[0]
    ids, mask = pipe.tokenizer(captions)
    y = pipe.text(ids, mask)
    drop = torch.rand(b, generator=gen) < cfg.cfg_dropout
    null = pipe.dit.null_caption[: y.shape[1]][None].expand_as(y)
    y = torch.where(drop[:, None, None], null, y)
    t = sample_t(cfg, step, b, gen)
    eps = torch.randn(x0.shape, generator=gen)
    tb = t[:, None, None, None, None]
    xt = (1 - tb) * x0 + tb * eps
    v = pipe.dit(xt, t * 1000, y, mask, fps=24, height=x0.shape[3], width=x0.shape[4])
    return torch.nn.functional.mse_loss(v, x0 - eps)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then (decay_steps > 0) linear decay to 0 at the last step."""
    factor = min(1.0, (step + 1) / cfg.warmup)
    if cfg.decay_steps > 0:
        factor = min(factor, (cfg.steps - step) / cfg.decay_steps)
    return cfg.lr * factor


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up of the average
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def swap(self):
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def save(pipe: DemoPipeline, ema: EMA, cfg: TrainConfig, step: int, loss: float, seconds: float):
    """Write the EMA weights to output_dir atomically (a sibling temp dir, then rename)."""
    tmp = cfg.output_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    ema.swap()
    try:
        # How far the caption words steer the layout from pure noise (runner.demo.evaluate's probe, seconds):
        # the direction gain is what a run must raise for the held-out captions to move as captioned.
        response = caption_response(demo_predict_x0(pipe), cfg.num_frames, cfg.size, noises=16,
                                    start=cfg.data_start)
        print(f"step {step} caption response at t = 1 (gain/cosine): "
              + ", ".join(f"{r['pair']} {r['gain']:.2f}/{r['cosine']:+.2f}" for r in response), file=sys.stderr)
        save_demo_dir(tmp, pipe, {"training": {
            "recipe": "python -m runner.demo.train", "step": step, "ema_loss": loss,
            "train_seconds": round(seconds, 1), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            "response": response,
        }})
    finally:
        ema.swap()
    old = cfg.output_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(cfg.output_dir):
        os.replace(cfg.output_dir, old)
    os.replace(tmp, cfg.output_dir)
    shutil.rmtree(old, ignore_errors=True)


def state_path(cfg: TrainConfig) -> str:
    return cfg.output_dir.rstrip("/") + ".train_state.pt"


def train(cfg: TrainConfig) -> dict:
    check_output_dir(cfg.output_dir)  # before anything is written
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if cfg.data_start not in demo_data.STARTS:
        raise ValueError(f"data_start must be one of {demo_data.STARTS}, not {cfg.data_start!r}")
    if not (0 <= cfg.t_uniform_min < 1 and 0 <= cfg.t_uniform_share <= 1):
        raise ValueError("t_uniform_min must be in [0, 1) and t_uniform_share in [0, 1]")
    pipe = build_demo(cfg.arch, cfg.seed)
    modules = [pipe.dit, pipe.text]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = EMA(modules, cfg.ema_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, elapsed_before, ema_loss = 0, 0.0, float("nan")
    if cfg.resume and os.path.exists(state_path(cfg)):
        st = torch.load(state_path(cfg), weights_only=False)
        for m, sd in zip(modules, st["modules"]):
            m.load_state_dict(sd)
        opt.load_state_dict(st["opt"])
        ema.shadow = st["ema"]
        rng.bit_generator.state = st["rng"]
        gen.set_state(st["gen"])
        start, elapsed_before, ema_loss = st["step"], st["seconds"], st["ema_loss"]
        print(f"resumed at step {start}", file=sys.stderr)
    for m in modules:
        m.train()
    t0 = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train_demo", unit="step", file=sys.stderr)
    step = start
    for step in range(start, cfg.steps):
        lr = learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, captions = demo_data.make_batch(rng, cfg.batch_size, cfg.num_frames, cfg.size, "train", cfg.data_start)
        loss = rf_loss(pipe, x0, captions, cfg, gen, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        value = loss.item()
        ema_loss = value if math.isnan(ema_loss) else 0.98 * ema_loss + 0.02 * value
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        seconds = elapsed_before + time.perf_counter() - t0
        done = step + 1 == cfg.steps or (cfg.max_minutes > 0 and seconds > 60 * cfg.max_minutes)
        if (step + 1) % cfg.log_every == 0:
            print(f"step {step + 1}/{cfg.steps} loss {ema_loss:.4f} lr {lr:.2e} {seconds:.0f}s", file=sys.stderr, flush=True)
        if (step + 1) % cfg.save_every == 0 or done:
            save(pipe, ema, cfg, step + 1, ema_loss, seconds)
            torch.save({
                "modules": [m.state_dict() for m in modules], "opt": opt.state_dict(), "ema": ema.shadow,
                "rng": rng.bit_generator.state, "gen": gen.get_state(), "step": step + 1, "seconds": seconds,
                "ema_loss": ema_loss,
            }, state_path(cfg))
        if done:
            break
    if bar is not None:
        bar.close()
    seconds = elapsed_before + time.perf_counter() - t0
    print(f"saved {cfg.output_dir} after {step + 1} steps, loss {ema_loss:.4f}, {seconds:.0f} s", file=sys.stderr)
    return {"steps": step + 1, "loss": ema_loss, "seconds": seconds}


ConfigStore.instance().store(name="train_demo_base", node=TrainConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train_demo")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        train(OmegaConf.to_object(dcfg))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()

