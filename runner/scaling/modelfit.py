"""The cost model (runner/scaling/costmodel.py) against a study's measured points.

For each point: the FLOPs of a computed step of each rank's shard over a throughput measured at 1
GPU (the 1-GPU point of the same cache: its FLOPs per computed step / its median computed-step
time), scaled by the cores a rank can have (on CPU: min(threads, cores / processes on the node),
the same for every rank; a GPU: 1), plus every collective the layout issues at this machine's
measured latency and bandwidth (DIR/collectives/pN.json from the sweep, or --comm), summed over the
point's computed-step pattern; reused steps cost the 1-GPU point's reused-step time times the
rank's share of the tokens, and no communication; plus the sampling loop's time outside the steps
at 1 GPU (the sampler's updates, the latent assemble's local part).
"""

from __future__ import annotations

import glob
import os

from models.stdit3 import STDiT3Config
from runner.scaling import costmodel

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class NoComm:
    """Used at 1 process (no collective is issued) and where no fit was measured."""

    def time(self, c) -> float:
        return 0.0


def load_fit(study: str, path: str | None = None) -> costmodel.CommFit | None:
    paths = [path] if path else sorted(glob.glob(os.path.join(study, "collectives", "p*.json")))
    fits = [costmodel.CommFit.load(p) for p in paths if os.path.isfile(p)]
    return costmodel.CommFit.merge(fits) if fits else None


def cores_per_rank(m: dict) -> float:
    """The cores one rank can use: its threads, unless the node's processes share fewer cores."""
    if m.get("device") == "cuda":
        return 1.0
    threads, cores = m.get("threads") or 1, m.get("cores") or 1
    return min(threads, cores / max(1, m.get("ranks_per_node") or 1))


def predict_row(row: dict, one: dict, comm) -> dict:
    """The model's sampling time for `row`, calibrated on `one` (its 1-GPU point, same cache)."""
    m = row["_model"]
    arch = STDiT3Config.from_dict(m["stdit3"])
    latent, text = tuple(m["latent"]), arch.model_max_length
    layout = row["layout"] if row["layout"] != "-" else "dsp"
    cfg = 2 if row["cfg_parallel"] else 1
    thr_one = costmodel.shard_flops(arch, latent, text, "dsp", 1, 1, 0) / one["computed_step_s"]
    thr = thr_one * cores_per_rank(m) / cores_per_rank(one["_model"])
    adaptive = row["cache"].startswith(("adacache", "teacache", "fbcache"))
    pred = costmodel.predict_video(
        arch, latent, text, layout, row["sp"], [c == "C" for c in row["pattern"]], comm, thr,
        reused_s=one.get("reused_step_s") or 0.0, cfg=cfg, dtype_bytes=DTYPE_BYTES.get(m.get("dtype"), 4),
        agreement_scalars=costmodel.ADACACHE_SCALARS if adaptive else 0)
    # the sampler's own work between model calls, as measured at 1 GPU, is the same at every count
    pred["loop_s"] = one.get("loop_s") or 0.0
    pred["total_s"] += pred["loop_s"]
    return pred


def annotate(study: str, rows: list[dict], env: dict, comm_path: str | None = None) -> None:
    """Add predicted_s, model_comm_s and model_error to the measured rows (where the model applies)."""
    fit = load_fit(study, comm_path)
    ok = [r for r in rows if r["status"] == "ok" and r.get("_model", {}).get("latent")]
    for r in ok:
        one = next((o for o in ok if o["gpus"] == 1 and o["cache"] == r["cache"] and o["_key"] == r["_key"]
                    and o.get("computed_step_s")), None)
        if one is None or (r["gpus"] > 1 and fit is None):
            continue  # nothing to calibrate on, or no measured links
        pred = predict_row(r, one, fit if r["gpus"] > 1 else NoComm())
        r["predicted_s"] = pred["total_s"]
        r["model_comm_s"] = pred["comm_s"]
        r["model_cores_per_rank"] = cores_per_rank(r["_model"])
        if r.get("sampling_s"):
            r["model_error"] = pred["total_s"] / r["sampling_s"] - 1
