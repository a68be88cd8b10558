"""Score the demo model on held-out captions: does each video show the captioned colour moving in
the captioned direction (and which shape)? With a cache policy selected, also PSNR/SSIM of every
video against the uncached one with the same seed, and the DiT time of both.

    python -m runner.eval_demo                          # uncached, 30 steps, 20 held-out captions
    python -m runner.eval_demo --seeds 2 cache=adacache # any generation override after the flags
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter

import numpy as np
from hydra import compose, initialize_config_dir

from runner import demo_eval
from runner.config import Config, register_configs, resolve_device, resolve_dtype
from runner.demo_data import HELDOUT_CAPTIONS
from runner.generate import generate_one, prompt_seed
from runner.pipeline import build_pipeline
from runner.video import to_uint8


def compose_config(overrides: list[str]) -> Config:
    import os

    from omegaconf import OmegaConf

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def uses_cache(cfg: Config) -> bool:
    cache = getattr(cfg, "cache", None)
    return cache is not None and getattr(cache, "name", "none") != "none"


def without_cache(cfg: Config) -> Config:
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, name="none"))


def run_captions(pipe, cfg: Config, captions, seeds: int):
    videos, seconds = [], 0.0
    for s in range(seeds):
        for i, caption in enumerate(captions):
            t0 = time.perf_counter()
            video, _, _ = generate_one(pipe, cfg, caption, prompt_seed(cfg.seed + 1000 * s, i))
            seconds += time.perf_counter() - t0
            videos.append(to_uint8(video))
    return videos, seconds


def evaluate(cfg: Config, seeds: int = 1, captions=HELDOUT_CAPTIONS) -> dict:
    device = resolve_device(cfg.device)
    pipe = build_pipeline(cfg.model, device, resolve_dtype(cfg.model.dtype, device))
    videos, seconds = run_captions(pipe, cfg, captions, seeds)
    caps = [c for _ in range(seeds) for c in captions]
    result = demo_eval.score(videos, caps)
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
        out["psnr_db"] = float(np.mean([min(demo_eval.psnr(a, b), 100.0) for a, b in zip(videos, ref)]))
        out["ssim"] = float(np.mean([demo_eval.ssim(a, b) for a, b in zip(videos, ref)]))
        out["uncached_seconds"] = ref_seconds
    out["motion_counts"] = dict(sorted(Counter(item["motion_pred"] for item in result["per_item"]).items()))
    out["per_item"] = [
        {"caption": c, **{k: v for k, v in item.items() if k in ("ok", "motion_pred", "shape_pred", "colour_ok")}}
        for c, item in zip(caps, result["per_item"])
    ]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="seeds per caption")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("overrides", nargs="*", help="generation overrides, e.g. sampler.num_steps=30")
    args = ap.parse_args(argv)
    cfg = compose_config(["progress=false", *args.overrides])
    res = evaluate(cfg, args.seeds)
    for item in res["per_item"]:
        mark = "ok  " if item["ok"] else "FAIL"
        print(f"{mark} {item['caption']:<50} motion={item['motion_pred']:<8} shape={item['shape_pred']}")
    line = (f"held-out captions: {res['captions']}, colour+direction accuracy {res['accuracy_colour_motion']:.1%}, "
            f"colour alone {res['accuracy_colour']:.1%}, "
            f"shape accuracy {res['accuracy_shape']:.1%}, generation {res['generation_seconds']:.1f} s")
    if "psnr_db" in res:
        line += f", PSNR {res['psnr_db']:.2f} dB, SSIM {res['ssim']:.4f} vs uncached ({res['uncached_seconds']:.1f} s)"
    print(line)
    print("motion read as: " + ", ".join(f"{k} {v}" for k, v in res["motion_counts"].items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
