"""Train the embedded demo model: STDiT3 in pixel space plus its small text encoder, on the
procedural captioned clips of `runner.demo.data`, with Open-Sora 1.2's rectified-flow objective.

    python -m runner.demo.train                       # the shipped recipe -> runs/train_demo
    python -m runner.demo.ship runs/train_demo        # once finished: install it as assets/demo
    python -m runner.demo.train steps=200 output_dir=/tmp/demo max_minutes=5

The checkpoint (EMA weights, safetensors + config.json) is written every `save_every` steps and at
the end, atomically, so an interrupted run still leaves a usable model; `resume=true` continues
from the training state kept next to it (with the same `steps`: the lr decay depends on it; and
the same thread count for bit-exactness).

The defaults are the recipe after issue 17: the shipped run's (assets/demo/config.json) plus
Open-Sora 1.2's frame masks (`MaskRatios`: half of the samples get given frames, for image-to-video,
extension, loops and connect) and width 144. `mask_ratios=null arch.hidden_size=96` is the shipped
run's recipe. `init_from=DIR` fine-tunes a checkpoint of the same architecture.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Optional

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
    # 144 (the shipped model: 96): a 4x4 patch's 48 RGB values leave a 96-wide token little room
    # beside what it knows of the clip; its shapes come out ragged, patch-shaped blobs (40% shape
    # accuracy). Measured with one thread, 8x32x32, 30 steps with CFG: 144 samples in 1.84x the time
    # of 96 (the budget is 2x), patch 1x2x2 in 2.6x even at width 64; trained 150 steps on low and mid
    # noise, 144 had a lower loss than 96 at every t.
    hidden_size: int = 144
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
class MaskRatios:
    """Share of training samples whose clip gets each kind of frame mask (Open-Sora 1.2's
    MaskGenerator, drawn per sample); the rest, 1 - their sum, stay unmasked (text-to-video).
    A given frame is clean in x_t, takes timestep 0's modulation (x_mask False) and is left out of
    the loss. k counts frames (token frames with a temporal patch > 1).

    The shares follow what the demo model must do, not Open-Sora's stage-1 mix (~80% unmasked, many
    kinds at 0.5% each): text-to-video keeps half of the samples because the caption must still set
    the layout from pure noise, and a sample with given frames teaches that less (the frames show
    the layout); image-to-video and extension / loops (first 1 or first k frames) get most of the rest;
    the others keep the model from assuming the given frames are always at the start.
    """

    first_frame: float = 0.15  # image-to-video: frame 0 given
    first_k: float = 0.15  # extension and loops: the first k, k uniform in 1..T/2 (4 of 8: the evaluated case)
    last_k: float = 0.05  # the last k, k in 1..T/2 (a clip extended backwards)
    first_last: float = 0.05  # connect: the first k and the last k, k in 1..max(1, T/4)
    random: float = 0.10  # each frame given with probability p ~ U[0.1, 0.9], at least one generated


MASK_KINDS: tuple[str, ...] = tuple(f.name for f in fields(MaskRatios))


def mask_shares(ratios: MaskRatios) -> dict[str, float]:
    """Every kind's share plus "identity" (no mask) = 1 - their sum; ValueError if they do not fit."""
    shares = {k: float(getattr(ratios, k)) for k in MASK_KINDS}
    if any(not (0 <= v <= 1) for v in shares.values()) or sum(shares.values()) > 1 + 1e-9:
        raise ValueError(f"mask_ratios must each be in [0, 1] and sum to at most 1 (the rest is unmasked), "
                         f"got {shares}")
    return {**shares, "identity": max(0.0, 1 - sum(shares.values()))}


def frame_masks(ratios: MaskRatios, batch: int, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """(batch, frames) bool, True = generated, False = given: one kind per sample drawn by its share.

    A pure function of rng's state (the run keeps a generator of its own for it, so the data and the
    t/noise draws are the same with masks on or off, and resume restores it).
    """
    shares = mask_shares(ratios)
    names, cum = list(shares), np.cumsum(list(shares.values()))
    out = torch.ones(batch, frames, dtype=torch.bool)
    if frames < 2:  # nothing would be left to generate
        return out
    half, quarter = max(1, frames // 2), max(1, frames // 4)
    for i in range(batch):
        kind = names[min(int(np.searchsorted(cum, rng.random(), side="right")), len(names) - 1)]
        m = out[i]
        if kind == "first_frame":
            m[0] = False
        elif kind == "first_k":
            m[: rng.integers(1, half + 1)] = False
        elif kind == "last_k":
            m[frames - rng.integers(1, half + 1):] = False
        elif kind == "first_last":
            k = rng.integers(1, quarter + 1)
            m[:k] = False
            m[frames - k:] = False
        elif kind == "random":
            m[:] = torch.from_numpy(rng.random(frames) > rng.uniform(0.1, 0.9))
            if not m.any():
                m[-1] = True
    return out


@dataclass
class TrainConfig:
    arch: DemoArch = field(default_factory=DemoArch)
    # Frame masks (see MaskRatios); null: none, every sample is text-to-video (the shipped run's recipe).
    mask_ratios: Optional[MaskRatios] = field(default_factory=MaskRatios)
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
    # Where a moving shape starts in samples with given frames; null: data_start. An edge start only
    # ever gives the model a shape at the edge, a loop's carried-over frame has it mid-frame:
    # "inside" / "through" show that (through: the shape may leave the frame, as a loop's track must
    # once it reaches the border). The given frames hold the position, so no caption cue is lost.
    masked_start: Optional[str] = None
    num_frames: int = 8
    size: int = 32
    seed: int = 0
    # Fine-tune: start from the weights of this demo checkpoint (a runner.demo.train output_dir or
    # builtin:demo) instead of random ones; its architecture must be `arch`. "": from scratch.
    init_from: str = ""
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


def init_weights_from(pipe: DemoPipeline, path: str) -> None:
    """Load a demo checkpoint's weights into pipe (fine-tuning); its architecture must match."""
    from runner.config import ModelConfig
    from runner.families import build_pipeline

    src = build_pipeline(ModelConfig(family="demo", weights=path), torch.device("cpu"), torch.float32)
    if (src.dit.config.to_dict() != pipe.dit.config.to_dict() or src.text.config != pipe.text.config
            or src.tokenizer.vocab != pipe.tokenizer.vocab):
        raise ValueError(f"init_from={path!r} has another architecture or vocabulary than arch: "
                         f"{src.dit.config.to_dict()} vs {pipe.dit.config.to_dict()}")
    pipe.dit.load_state_dict(src.dit.state_dict())
    pipe.text.load_state_dict(src.text.state_dict())


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
            step: int = 0, x_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample rectified-flow losses (B,); the training loss is their mean. x_t = (1 - t) x0 + t eps,
    the model predicts v = x0 - eps; t from `sample_t`.

    x_mask (B, T) bool from `frame_masks` (per token frame), False = given: as Open-Sora 1.2's
    training_losses, those frames stay x0 in x_t, the model gets x_mask, and a sample's loss is its
    mean over its generated frames only. None: no x_mask reaches the model.
    """
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
    if x_mask is None:
        v = pipe.dit(xt, t * 1000, y, mask, fps=24, height=x0.shape[3], width=x0.shape[4])
        return (v - (x0 - eps)).pow(2).flatten(1).mean(1)
    gen_frames = x_mask.repeat_interleave(x0.shape[2] // x_mask.shape[1], dim=1)  # token frames -> frames
    xt = torch.where(gen_frames[:, None, :, None, None], xt, x0)
    v = pipe.dit(xt, t * 1000, y, mask, fps=24, height=x0.shape[3], width=x0.shape[4], x_mask=x_mask)
    err = (v - (x0 - eps)).pow(2).mean(dim=(1, 3, 4))  # (B, T)
    keep = gen_frames.to(err.dtype)
    return (err * keep).sum(1) / keep.sum(1)


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


def training_batch(cfg: TrainConfig, rng: np.random.Generator, mask_rng: np.random.Generator):
    """One step's (clips, captions, x_mask or None). The masks come from mask_rng and the clips from
    rng alone, so masked_start changes the masked samples' geometry and nothing else."""
    x_mask = None
    starts = cfg.data_start
    if cfg.mask_ratios is not None:
        x_mask = frame_masks(cfg.mask_ratios, cfg.batch_size, cfg.num_frames // cfg.arch.patch_size[0], mask_rng)
        if cfg.masked_start is not None:
            starts = [cfg.data_start if row.all() else cfg.masked_start for row in x_mask]
    x0, captions = demo_data.make_batch(rng, cfg.batch_size, cfg.num_frames, cfg.size, "train", starts)
    return x0, captions, x_mask


def state_path(cfg: TrainConfig) -> str:
    return cfg.output_dir.rstrip("/") + ".train_state.pt"


def train(cfg: TrainConfig) -> dict:
    check_output_dir(cfg.output_dir)  # before anything is written
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if cfg.data_start not in demo_data.STARTS:
        raise ValueError(f"data_start must be one of {demo_data.STARTS}, not {cfg.data_start!r}")
    if cfg.masked_start is not None and cfg.masked_start not in demo_data.STARTS:
        raise ValueError(f"masked_start must be one of {demo_data.STARTS} or null, not {cfg.masked_start!r}")
    if not (0 <= cfg.t_uniform_min < 1 and 0 <= cfg.t_uniform_share <= 1):
        raise ValueError("t_uniform_min must be in [0, 1) and t_uniform_share in [0, 1]")
    pt = cfg.arch.patch_size[0]
    if cfg.mask_ratios is not None:
        shares = mask_shares(cfg.mask_ratios)
        print("frame masks (share of samples): " + ", ".join(f"{k} {v:.3g}" for k, v in shares.items()),
              file=sys.stderr)
        if cfg.num_frames % pt:
            raise ValueError(f"frame masks need num_frames ({cfg.num_frames}) divisible by the temporal patch {pt}")
    pipe = build_demo(cfg.arch, cfg.seed)
    modules = [pipe.dit, pipe.text]
    if cfg.init_from:
        init_weights_from(pipe, cfg.init_from)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = EMA(modules, cfg.ema_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # A stream of its own (not rng's, not gen's): the clips, t and noise are those of the unmasked recipe.
    mask_rng = np.random.default_rng([cfg.seed, 1])
    start, elapsed_before, ema_loss = 0, 0.0, float("nan")
    split_loss = [float("nan"), float("nan")]  # EMA losses of unmasked and masked samples (logged only)
    if cfg.resume and os.path.exists(state_path(cfg)):
        st = torch.load(state_path(cfg), weights_only=False)
        for m, sd in zip(modules, st["modules"]):
            m.load_state_dict(sd)
        opt.load_state_dict(st["opt"])
        ema.shadow = st["ema"]
        rng.bit_generator.state = st["rng"]
        gen.set_state(st["gen"])
        if "mask_rng" in st:  # absent in states written before frame masks
            mask_rng.bit_generator.state = st["mask_rng"]
        start, elapsed_before, ema_loss = st["step"], st["seconds"], st["ema_loss"]
        split_loss = st.get("split_loss", split_loss)
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
        x0, captions, x_mask = training_batch(cfg, rng, mask_rng)
        losses = rf_loss(pipe, x0, captions, cfg, gen, step, x_mask)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        value = loss.item()
        ema_loss = value if math.isnan(ema_loss) else 0.98 * ema_loss + 0.02 * value
        if x_mask is not None:  # the two kinds of sample apart: do the given frames make it easier?
            masked = ~x_mask.all(1)
            for i, sel in enumerate((~masked, masked)):
                if sel.any():
                    part = losses.detach()[sel].mean().item()
                    split_loss[i] = part if math.isnan(split_loss[i]) else 0.98 * split_loss[i] + 0.02 * part
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        seconds = elapsed_before + time.perf_counter() - t0
        done = step + 1 == cfg.steps or (cfg.max_minutes > 0 and seconds > 60 * cfg.max_minutes)
        if (step + 1) % cfg.log_every == 0:
            split = "" if cfg.mask_ratios is None else f" (unmasked {split_loss[0]:.4f}, masked {split_loss[1]:.4f})"
            print(f"step {step + 1}/{cfg.steps} loss {ema_loss:.4f}{split} lr {lr:.2e} {seconds:.0f}s", file=sys.stderr,
                  flush=True)
        if (step + 1) % cfg.save_every == 0 or done:
            save(pipe, ema, cfg, step + 1, ema_loss, seconds)
            torch.save({
                "modules": [m.state_dict() for m in modules], "opt": opt.state_dict(), "ema": ema.shadow,
                "rng": rng.bit_generator.state, "gen": gen.get_state(), "mask_rng": mask_rng.bit_generator.state,
                "step": step + 1, "seconds": seconds, "ema_loss": ema_loss, "split_loss": split_loss,
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

