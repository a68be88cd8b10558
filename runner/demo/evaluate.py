"""Score the demo model on held-out captions: does each video show the captioned colour moving in
the captioned direction (and which shape)? With a cache policy selected, also PSNR/SSIM of every
video against the uncached one with the same seed, and the DiT time of both. Then the reference-frame
modes: given the first k frames of a training-distribution clip, does the rest continue the clip
(its colour, its track from where the given frames left it, its direction; `judge.continuation`),
and with loop=N, does the track continue across the seams (`judge.seams`)?

    python -m runner.demo.evaluate                          # uncached, 30 steps, 20 held-out captions
    python -m runner.demo.evaluate --given 1 4 --loop 3     # the default continuation and loop scores
    python -m runner.demo.evaluate --given --loop 1         # text-to-video only
    python -m runner.demo.evaluate --seeds 2 cache=adacache # any generation override after the flags
    python -m runner.demo.evaluate --response-only          # seconds: how each caption word moves t = 1
    python -m runner.demo.evaluate --denoise 0.25 0.5       # shape kept when finishing noised clips

The caption response compares what the model predicts from pure noise (t = 1, where the sampler
lays the clip out) for two captions that differ in one word with how the training clips' mean
differs between them: a gain near 1 and cosine near 1 mean the word is followed from the first
step; a gain near 0 means the word is ignored there and the layout comes from the noise.

`--denoise T` noises training clips to the sampler's step at noise level T and lets the sampler
finish them: the share whose shape is still read right tells from which noise level on the model
turns shapes into blobs (a shape lost from a real clip at T is not a layout problem above T).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from functools import lru_cache

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from runner.config import CONF_DIR, Config, register_configs, resolve_device, resolve_dtype
from runner.demo import data as demo_data
from runner.demo import judge
from runner.demo.data import HELDOUT_CAPTIONS
from runner.assemble import assemble
from runner.families import build_pipeline
from runner import conditioning
from runner.generate import generate_one, prompt_seed, sample_prompt
from runner.sampler import make_timesteps, sample
from runner.video import to_uint8


def compose_config(overrides: list[str]) -> Config:
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def uses_cache(cfg: Config) -> bool:
    cache = getattr(cfg, "cache", None)
    return cache is not None and getattr(cache, "name", "none") != "none"


def without_cache(cfg: Config) -> Config:
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, name="none"))


def run_captions(pipe, cfg: Config, captions, seeds: int):
    job = assemble(cfg, pipe=pipe)  # cfg's cache policy on the loaded model, taken off after
    videos, seconds = [], 0.0
    try:
        for s in range(seeds):
            for i, caption in enumerate(captions):
                t0 = time.perf_counter()
                video, _, _ = generate_one(job, cfg, caption, prompt_seed(cfg.seed + 1000 * s, i))
                seconds += time.perf_counter() - t0
                videos.append(to_uint8(video))
    finally:
        job.release()
    return videos, seconds


def training_captions(n: int = 20, seed: int = 123) -> tuple[str, ...]:
    """n distinct moving captions of the training split, a fixed draw: for choosing sampler
    settings without looking at the held-out captions."""
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    while len(captions) < n:
        spec = demo_data.sample_spec(rng, "train")
        if spec.motion != "still" and spec.caption not in captions:
            captions.append(spec.caption)
    return tuple(captions)


# Pairs of captions differing in one word, all from the training split (magenta and the circle
# are in no held-out pair with a direction, a colour or each other).
RESPONSE_PAIRS: tuple[tuple[str, str, str], ...] = tuple(
    (name, f"a {a} moves {da} on a dark background", f"a {b} moves {db} on a dark background")
    for name, a, da, b, db in (
        ("colour", "magenta circle", "right", "yellow circle", "right"),
        ("shape", "magenta circle", "right", "magenta square", "right"),
        ("direction left/right", "magenta circle", "left", "magenta circle", "right"),
        ("direction up/down", "magenta circle", "up", "magenta circle", "down"),
    )
)


@lru_cache(maxsize=64)
def data_mean(caption: str, num_frames: int, size: int, samples: int = 400, seed: int = 0,
              start: str = "anywhere") -> torch.Tensor:
    """Mean training clip (3, T, H, W) in [-1, 1] over random geometries for a caption (cached: do
    not modify it). `start`: the training data's `demo_data.STARTS` setting."""
    rng = np.random.default_rng(seed)
    specs = [demo_data.spec_from_caption(caption, rng, start=start) for _ in range(samples)]
    return demo_data.to_model_range(demo_data.render_batch(specs, num_frames, size)).mean(0)


def caption_response(predict_x0, num_frames: int, size: int, pairs=RESPONSE_PAIRS, noises: int = 32,
                     samples: int = 400, seed: int = 0, start: str = "anywhere") -> list[dict]:
    """For each (name, a, b): gain |m(a) - m(b)| / |d(a) - d(b)| and their cosine, where m is the
    prediction at t = 1 averaged over `noises` shared noises and d the data mean (`data_mean`).

    predict_x0(captions, z) -> x0 estimate (B, 3, T, H, W) from pure noise z (B, 3, T, H, W).
    """
    z = torch.randn((noises, 3, num_frames, size, size), generator=torch.Generator().manual_seed(seed))
    cache: dict[str, torch.Tensor] = {}

    def model_mean(caption: str) -> torch.Tensor:
        if caption not in cache:
            cache[caption] = predict_x0([caption] * noises, z).float().mean(0)
        return cache[caption]

    out = []
    for name, a, b in pairs:
        pred = (model_mean(a) - model_mean(b)).flatten()
        data = (data_mean(a, num_frames, size, samples, seed, start)
                - data_mean(b, num_frames, size, samples, seed, start)).flatten()
        out.append({"pair": name, "gain": float(pred.norm() / data.norm()),
                    "cosine": float(torch.nn.functional.cosine_similarity(pred, data, dim=0))})
    return out


def demo_predict_x0(pipe, fps: float = 24.0):
    """predict_x0 for a demo pipeline (rectified flow: x_t = (1 - t) x0 + t eps, v = x0 - eps, so at
    t = 1 the estimate is z + v)."""

    @torch.no_grad()
    def predict(captions: list[str], z: torch.Tensor) -> torch.Tensor:
        cond = pipe.encode_text(captions)  # [cond; null]: the cond half only, no CFG here
        dtype = pipe.dit.x_embedder.proj.weight.dtype
        zz = z.to(pipe.device, dtype)
        t = torch.full((len(captions),), 1000.0, device=pipe.device)
        y = cond.y[: len(captions)].to(dtype)
        v = pipe.dit(zz, t, y, cond.mask, fps=fps, height=z.shape[-2], width=z.shape[-1])
        return (zz + v).cpu()

    return predict


def continuation_clips(n: int, num_frames: int, size: int, seed: int = 321, start: str = "anywhere"):
    """n moving clips of the training split (a fixed draw): the specs and uint8 (n, T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    specs = []
    while len(specs) < n:
        spec = demo_data.sample_spec(rng, "train", start=start)
        if spec.motion != "still":
            specs.append(spec)
    return specs, demo_data.render_batch(specs, num_frames, size)


def given_frames(video: torch.Tensor, given: int, loops: int, num_frames: int) -> conditioning.PromptConditioning:
    """The conditioning of `given` first frames of `video` (3, T, H, W), as condition=extend would
    place them (the demo's frames are its latent frames); given=0: none (text to video)."""
    plan = conditioning.loop_plan(loops, num_frames, 1, references=1 if given else 0)
    entries = conditioning.parse_mask_strategy(f"0,0,0,0,{given},0") if given else []
    return conditioning.PromptConditioning([""] * loops, [], [video[:, :given]] if given else [],
                                           entries + list(plan.entries), plan)


def run_continuations(pipe, cfg: Config, given: int, specs, clips) -> list[dict]:
    """Generate the rest of every clip from its first `given` frames and its caption; judge each."""
    job = assemble(cfg, pipe=pipe)
    out = []
    try:
        for i, (spec, clip) in enumerate(zip(specs, clips)):
            plan = given_frames(demo_data.to_model_range(clip[None])[0], given, 1, cfg.num_frames)
            cond = pipe.encode_text([spec.caption])
            video, *_ = sample_prompt(job, cfg, spec.caption, prompt_seed(cfg.seed, i), plan, lambda loop: cond)
            out.append(judge.continuation(to_uint8(video), clip, spec.caption, given))
    finally:
        job.release()
    return out


def run_loops(pipe, cfg: Config, loops: int, captions) -> list[dict]:
    """Each caption as `loops` loops from text (each carrying its last frame over); judge the seams."""
    job = assemble(cfg, pipe=pipe)
    out = []
    try:
        for i, caption in enumerate(captions):
            plan = given_frames(torch.zeros(0), 0, loops, cfg.num_frames)
            cond = pipe.encode_text([caption])
            video, *_ = sample_prompt(job, cfg, caption, prompt_seed(cfg.seed, i), plan, lambda loop: cond)
            out.append(judge.seams(to_uint8(video), caption, cfg.num_frames, plan.plan.cut))
    finally:
        job.release()
    return out


def score_continuations(items: list[dict]) -> dict:
    return {"clips": len(items), "accuracy": float(np.mean([it["ok"] for it in items])),
            "colour": float(np.mean([it["colour_ok"] for it in items])),
            "motion": float(np.mean([it["motion_ok"] for it in items])),
            "position": float(np.mean([it["position_ok"] for it in items])),
            "mean_position_error": float(np.mean([min(it["position_error"], 1.0) for it in items]))}


def score_loops(items: list[dict], motions) -> dict:
    """Seams passed; and per loop, the share of videos whose loop reads as the captioned motion."""
    loops = len(items[0]["loop_motions"]) if items else 0
    return {"videos": len(items), "frames": items[0]["frames"] if items else 0,
            "seams_ok": float(np.mean([it["ok"] for it in items])),
            "loop_motion": [float(np.mean([it["loop_motions"][k] == m for it, m in zip(items, motions)]))
                            for k in range(loops)]}


def first_step_at(timesteps: list[float], level: float, num_timesteps: int) -> int:
    """Index of the sampler's first step at noise level `level` (t / num_timesteps) or below."""
    for i, t in enumerate(timesteps):
        if t <= level * num_timesteps + 1e-6:
            return i
    last = timesteps[-1] / num_timesteps
    raise ValueError(f"noise level {level} is below the sampler's last step, t = {last:.3f}")


@torch.no_grad()
def run_denoise(pipe, cfg: Config, level: float, specs, clips) -> tuple[list[dict], int, float]:
    """Noise every clip (uint8 (B, T, H, W, 3)) to the sampler's first step at `level` or below, as
    rectified flow does (x_t = (1 - t) x0 + t eps, eps from cfg.seed), let the sampler finish it with
    its caption (CFG as configured) and judge it. Returns the judgements, that step's index and t."""
    s = cfg.sampler
    height, width = pipe.conditioning_size(cfg.height, cfg.width)
    timesteps = make_timesteps(s, height, width, cfg.num_frames)
    start = first_step_at(timesteps, level, s.num_timesteps)
    t = timesteps[start] / s.num_timesteps
    dtype = pipe.dit.x_embedder.proj.weight.dtype
    x0 = demo_data.to_model_range(clips).to(pipe.device, dtype)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(pipe.device, dtype)
    cond = pipe.encode_text([spec.caption for spec in specs])  # [cond; null], as the sampler's batch

    def model_fn(z_in, t_in, info):
        return pipe.dit(z_in.to(dtype), t_in, cond.y.to(dtype), cond.mask, fps=cfg.fps, height=height, width=width)

    z = sample(model_fn, (1 - t) * x0 + t * eps, s, timesteps, pipe.latent_channels, start=start)
    return [judge.judge(to_uint8(v), spec.caption) for v, spec in zip(z, specs)], start, t


def score_denoise(items: list[dict], specs) -> dict:
    """Shape read right, overall and per shape (right / clips), and colour + direction."""
    kept = [it["shape_pred"] == spec.shape for it, spec in zip(items, specs)]
    per_shape = {}
    for ok, spec in zip(kept, specs):
        right, n = per_shape.get(spec.shape, (0, 0))
        per_shape[spec.shape] = (right + ok, n + 1)
    return {"clips": len(items), "shape": float(np.mean(kept)),
            "colour_motion": float(np.mean([it["ok"] for it in items])), "per_shape": dict(sorted(per_shape.items()))}


def denoise(cfg: Config, levels, clips: int = 30) -> list[dict]:
    pipe = load_pipeline(cfg)
    specs, videos = continuation_clips(clips, cfg.num_frames, cfg.height, start=trained_start(pipe))
    out = []
    for level in levels:
        items, start, t = run_denoise(pipe, cfg, level, specs, videos)
        out.append({"level": level, "t": t, "steps": cfg.sampler.num_steps - start, **score_denoise(items, specs)})
    return out


def print_denoise(rows: list[dict]) -> None:
    for r in rows:
        shapes = ", ".join(f"{k} {a}/{n}" for k, (a, n) in r["per_shape"].items())
        print(f"denoised from t = {r['t']:.3f} ({r['steps']} steps), {r['clips']} training clips: shape kept "
              f"{r['shape']:.1%} ({shapes}), colour + direction {r['colour_motion']:.1%}")


def load_pipeline(cfg: Config):
    device = resolve_device(cfg.device)
    return build_pipeline(cfg.model, device, resolve_dtype(cfg.model.dtype, device))


def evaluate(cfg: Config, seeds: int = 1, captions=HELDOUT_CAPTIONS, given=(), loops: int = 1,
             clips: int = 20) -> dict:
    """Text to video on `captions`; then for each k in `given` the continuation of `clips` training
    clips from their first k frames, and with loops > 1 the seams of `captions` as loops."""
    pipe = load_pipeline(cfg)
    videos, seconds = run_captions(pipe, cfg, captions, seeds)
    caps = [c for _ in range(seeds) for c in captions]
    result = judge.score(videos, caps)
    out = {
        "captions": len(caps),
        "accuracy_colour": result["accuracy_colour"],
        "accuracy_colour_motion": result["accuracy_colour_motion"],
        "accuracy_shape": result["accuracy_shape"],
        "generation_seconds": seconds,
        "weights": pipe.describe()["weights"],
        "num_steps": cfg.sampler.num_steps,
    }
    if uses_cache(cfg):
        ref, ref_seconds = run_captions(pipe, without_cache(cfg), captions, seeds)
        out["psnr_db"] = float(np.mean([min(judge.psnr(a, b), 100.0) for a, b in zip(videos, ref)]))
        out["ssim"] = float(np.mean([judge.ssim(a, b) for a, b in zip(videos, ref)]))
        out["uncached_seconds"] = ref_seconds
    if cfg.height == cfg.width:
        out["response"] = caption_response(demo_predict_x0(pipe), cfg.num_frames, cfg.height, start=trained_start(pipe))
    out["motion_counts"] = dict(sorted(Counter(item["motion_pred"] for item in result["per_item"]).items()))
    out["per_item"] = [
        {"caption": c, **{k: v for k, v in item.items() if k in ("ok", "motion_pred", "shape_pred", "colour_ok")}}
        for c, item in zip(caps, result["per_item"])
    ]
    if given:
        specs, videos = continuation_clips(clips, cfg.num_frames, cfg.height, start=trained_start(pipe))
        out["continuation"] = {}
        for k in given:
            items = run_continuations(pipe, cfg, k, specs, videos)
            out["continuation"][str(k)] = {**score_continuations(items), "per_item": items}
    if loops > 1:
        items = run_loops(pipe, cfg, loops, captions)
        motions = [demo_data.parse_caption(c)["motion"] for c in captions]
        out["loops"] = {"loop": loops, **score_loops(items, motions), "per_item": items}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m runner.demo.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="seeds per caption")
    ap.add_argument("--split", choices=("heldout", "train"), default="heldout",
                    help="the held-out captions (the score), or 20 training-split ones (for tuning)")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--given", type=int, nargs="*", default=None, metavar="K",
                    help="continuation scores from the first K frames of training clips (default: 1 and "
                         "half the frames; none with an empty list)")
    ap.add_argument("--loop", type=int, default=3, metavar="N",
                    help="seams of the captions generated as N loops (default 3; 1: none)")
    ap.add_argument("--clips", type=int, default=20, help="training clips per continuation score")
    ap.add_argument("--response-only", action="store_true",
                    help="only the caption response at t = 1 (no sampling, seconds)")
    ap.add_argument("--denoise", type=float, nargs="+", metavar="T",
                    help="only this: training clips noised to level T (0 to 1) and finished by the sampler, "
                         "is their shape kept?")
    ap.add_argument("overrides", nargs="*", help="generation overrides, e.g. sampler.num_steps=30")
    args = ap.parse_args(argv)
    cfg = compose_config(["progress=false", *args.overrides])
    if cfg.model.family != "demo":
        raise SystemExit("runner.demo.evaluate scores the demo model family (model=demo)")
    if args.response_only:
        res = {"response": response(cfg)}
        print_response(res["response"])
    elif args.denoise:
        if cfg.height != cfg.width:
            raise SystemExit("--denoise needs square frames")
        if any(not 0 < t <= 1 for t in args.denoise):
            raise SystemExit("--denoise takes noise levels in (0, 1]")
        try:
            res = {"denoise": denoise(cfg, args.denoise, args.clips)}
        except ValueError as e:  # a level below the last step
            raise SystemExit(str(e)) from None
        print_denoise(res["denoise"])
    else:
        heldout = args.split == "heldout"
        given = args.given if args.given is not None else sorted({1, cfg.num_frames // 2})
        if any(not 1 <= k < cfg.num_frames for k in given):
            raise SystemExit(f"--given takes 1 to {cfg.num_frames - 1} frames (num_frames={cfg.num_frames})")
        if args.loop < 1:
            raise SystemExit("--loop must be >= 1")
        if cfg.height != cfg.width and given:
            raise SystemExit("the continuation clips need square frames (or --given with no value)")
        res = evaluate(cfg, args.seeds, HELDOUT_CAPTIONS if heldout else training_captions(), given, args.loop,
                       args.clips)
        print_result(res, "held-out captions" if heldout else "training-split captions")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)


def response(cfg: Config) -> list[dict]:
    if cfg.height != cfg.width:
        raise SystemExit("the caption response needs square frames")
    pipe = load_pipeline(cfg)
    return caption_response(demo_predict_x0(pipe), cfg.num_frames, cfg.height, start=trained_start(pipe))


def trained_start(pipe) -> str:
    """The `data_start` the checkpoint was trained with (its config.json), else "anywhere"."""
    path = os.path.join(pipe.source, "config.json")  # source: a directory, or "random"/"trained"
    if not os.path.isfile(path):
        return "anywhere"
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("training", {}).get("config", {}).get("data_start", "anywhere")


def print_response(rows: list[dict]) -> None:
    print("caption response at t = 1 (model / training data; 1 and 1 = followed, 0 = ignored):")
    for r in rows:
        print(f"  {r['pair']:<22} gain {r['gain']:.3f}  cosine {r['cosine']:+.3f}")


def print_result(res: dict, label: str = "held-out captions") -> None:
    for item in res["per_item"]:
        mark = "ok  " if item["ok"] else "FAIL"
        print(f"{mark} {item['caption']:<50} motion={item['motion_pred']:<8} shape={item['shape_pred']}")
    line = (f"{label}: {res['captions']}, colour+direction accuracy {res['accuracy_colour_motion']:.1%}, "
            f"colour alone {res['accuracy_colour']:.1%}, "
            f"shape accuracy {res['accuracy_shape']:.1%}, generation {res['generation_seconds']:.1f} s")
    if "psnr_db" in res:
        line += f", PSNR {res['psnr_db']:.2f} dB, SSIM {res['ssim']:.4f} vs uncached ({res['uncached_seconds']:.1f} s)"
    print(line)
    print("motion read as: " + ", ".join(f"{k} {v}" for k, v in res["motion_counts"].items()))
    if "response" in res:
        print_response(res["response"])
    for k, c in res.get("continuation", {}).items():
        print(f"continuation from the first {k} frame(s) of {c['clips']} training clips: {c['accuracy']:.1%} "
              f"(colour {c['colour']:.1%}, direction {c['motion']:.1%}, position {c['position']:.1%}, "
              f"mean position error {c['mean_position_error']:.3f} of the frame)")
    if "loops" in res:
        lp = res["loops"]
        print(f"loop={lp['loop']} ({lp['frames']} frames) on the {lp['videos']} captions: the track continues "
              f"across the seams in {lp['seams_ok']:.1%}; loops moving as captioned: "
              + ", ".join(f"loop {i} {v:.1%}" for i, v in enumerate(lp["loop_motion"])))


if __name__ == "__main__":
    sys.exit(main())
