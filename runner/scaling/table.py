"""One table for a scaling study: every point of DIR/points/ in one row (CSV, JSON, Markdown), plots.

    python -m runner.scaling report DIR [--comm FIT.json] [--no-plots]

Per point, over its measured videos (the sweep's warm-up videos are left out):
  sampling_s / e2e_s     median seconds of the sampling loop / of one video end to end (setup,
                         text encoding, sampling, decoding, writing); sampling_min_s the minimum
  speedup, efficiency    over the 1-GPU point of the same cache (sampling); speedup / GPUs
  cache_speedup          the no-cache point at the same GPUs, layout and CFG split / this point
  retention              cache_speedup here / cache_speedup at 1 GPU
  bytes_per_computed_step  collective payload per rank per computed step (mean over ranks)
  reused_step_collectives  collectives any rank ran on a reused step (the rule: 0)
  peak_mem_mb            the largest peak of any rank (GPU allocated on CUDA, else host RSS)
  cores_per_rank         CPU seconds / wall seconds of the sampling loop, median over ranks: the
                         cores a rank really had (on CPU; < threads when processes share cores)
  psnr_db                the video against the 1-GPU video of the same settings and seed (inf:
                         identical frames), the smallest over the videos
  predicted_s, model_error  the cost model's sampling time (runner/scaling/modelfit.py) and its
                         relative error; model_comm_s its communication part, model_cores_per_rank
                         the cores it gives each rank (CPU: min(threads, cores / processes))
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys

COLUMNS = [
    "point", "status", "gpus", "nodes", "layout", "cfg_parallel", "sp", "cache", "size", "steps", "videos",
    "sampling_s", "sampling_min_s", "e2e_s", "speedup", "efficiency", "cache_speedup", "retention",
    "computed_steps", "pattern", "computed_step_s", "reused_step_s", "bytes_per_computed_step",
    "reused_step_collectives", "peak_mem_mb", "cores_per_rank", "psnr_db",
    "setup_s", "text_s", "decode_s", "write_s", "model_cores_per_rank", "predicted_s", "model_comm_s", "model_error",
    "error",
]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load_point(pdir: str) -> tuple[dict, list[dict]]:
    """-> (point.json, the measured videos' reports in index order)."""
    with open(os.path.join(pdir, "point.json"), encoding="utf-8") as f:
        rec = json.load(f)
    out = os.path.join(pdir, "out")
    reports = []
    if os.path.isdir(out):
        for name in sorted(os.listdir(out)):
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(out, name), encoding="utf-8") as f:
                    reports.append(json.load(f))
    reports.sort(key=lambda r: r.get("index") or 0)
    return rec, [r for r in reports if (r.get("index") or 0) >= rec.get("warmup_videos", 0)]


def _ranks(rep: dict) -> list[dict]:
    return rep.get("parallel", {}).get("collectives_per_rank", [])


def _step_bytes(rep: dict, computed: bool) -> tuple[list[float], int]:
    """(payload bytes per rank per step of the kind, summed over ops) and the collectives counted."""
    pattern = rep.get("cache", {}).get("pattern") or ""
    per_rank, count = [], 0
    for r in _ranks(rep):
        steps = [(int(s), ops) for s, ops in r.get("per_step", {}).items()]
        chosen = [ops for s, ops in steps if (pattern[s] == "C" if s < len(pattern) else True) == computed]
        if chosen:
            per_rank.append(sum(o["bytes"] for ops in chosen for o in ops.values()) / len(chosen))
        count += sum(o["count"] for ops in chosen for o in ops.values())
    return per_rank, count


def _peak_mb(rep: dict) -> float | None:
    peaks = []
    for r in _ranks(rep) or [{"memory": rep.get("memory", {})}]:
        m = r.get("memory") or {}
        peaks.append(m.get("gpu_peak_allocated_mb", m.get("host_peak_rss_mb")))
    return max((p for p in peaks if p is not None), default=None)


def _cores(rep: dict) -> float | None:
    shares = []
    for r in _ranks(rep) or [{"memory": rep.get("memory", {})}]:
        ph = (r.get("memory") or {}).get("phases", {}).get("sampling", {})
        if ph.get("seconds") and ph.get("cpu_s") is not None:
            shares.append(ph["cpu_s"] / ph["seconds"])
    return median(shares)


def summarize(rec: dict, reports: list[dict]) -> dict:
    """One row from a point's record and its measured reports (the columns that need no other point)."""
    row = {"point": rec["id"], "status": rec["status"], "gpus": rec["gpus"], "layout": rec.get("layout") or "-",
           "cfg_parallel": bool(rec.get("cfg_parallel")), "sp": rec.get("sp", rec["gpus"]), "cache": rec["cache"],
           "error": rec.get("error") or ""}
    if rec["status"] == "ok" and not reports:
        row.update(status="failed", error="no measured report in out/")
    if row["status"] != "ok":
        return row
    first = reports[0]
    fr, cfg = first["frames"], first["config"]
    t = [r["timings"] for r in reports]
    pattern = first.get("cache", {}).get("pattern") or "C" * len(first["step_times_s"])
    comp_bytes = [median(_step_bytes(r, True)[0]) for r in reports]
    row.update(
        nodes=first.get("host", {}).get("nodes", 1), size=f"{fr['count']}x{fr['height']}x{fr['width']}",
        steps=len(first["step_times_s"]), videos=len(reports),
        sampling_s=median(x["sampling_s"] for x in t), sampling_min_s=min(x["sampling_s"] for x in t),
        e2e_s=median(sum(x.get(k, 0.0) for k in ("setup_s", "text_encoding_s", "sampling_s", "decoding_s", "writing_s"))
                     for x in t),
        computed_steps=f"{pattern.count('C')}/{len(pattern)}", pattern=pattern,
        computed_step_s=median(r.get("steps", {}).get("computed", {}).get("median_s") for r in reports),
        reused_step_s=median(r.get("steps", {}).get("reused", {}).get("median_s") for r in reports),
        # the sampling loop's time outside the timed steps (sampler updates, assemble)
        loop_s=median(r["timings"]["sampling_s"] - sum(r["step_times_s"]) for r in reports),
        bytes_per_computed_step=median(comp_bytes) or 0,
        reused_step_collectives=sum(_step_bytes(r, False)[1] for r in reports),
        peak_mem_mb=max((p for p in map(_peak_mb, reports) if p is not None), default=None),
        cores_per_rank=median(_cores(r) for r in reports),
        setup_s=median(x.get("setup_s") for x in t), text_s=median(x.get("text_encoding_s") for x in t),
        decode_s=median(x.get("decoding_s") for x in t), write_s=median(x.get("writing_s") for x in t),
    )
    row["_key"] = (row["size"], row["steps"], cfg.get("seed"))
    # what the cost model needs (runner/scaling/modelfit.py)
    row["_model"] = {"stdit3": first.get("model", {}).get("stdit3"), "latent": first.get("latent_shape"),
                     "dtype": first.get("dtype"), "threads": first.get("host", {}).get("threads_per_rank"),
                     "cores": first.get("host", {}).get("cpu_cores"), "device": first.get("host", {}).get("device_type"),
                     "ranks_per_node": first.get("host", {}).get("ranks_per_node", rec["gpus"])}
    row["_videos"] = {r["index"]: r["output"] for r in reports}
    return row


def _psnr(a, b) -> float:
    import numpy as np

    if a.shape != b.shape:
        return float("nan")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def relate(rows: list[dict], psnr: bool = True) -> None:
    """The columns that compare points: speed-ups, efficiency, cache speed-up and retention, PSNR."""
    ok = [r for r in rows if r["status"] == "ok"]

    def find(**want):
        return next((r for r in ok if all(r[k] == v for k, v in want.items())), None)

    for r in ok:
        base = find(gpus=1, cache=r["cache"], cfg_parallel=False, _key=r["_key"])
        if base and r["sampling_s"]:
            r["speedup"] = base["sampling_s"] / r["sampling_s"]
            r["efficiency"] = r["speedup"] / r["gpus"]
        plain = find(gpus=r["gpus"], layout=r["layout"], cfg_parallel=r["cfg_parallel"], cache="none", _key=r["_key"])
        if plain and r["sampling_s"]:
            r["cache_speedup"] = plain["sampling_s"] / r["sampling_s"]
    for r in ok:
        one = find(gpus=1, cache=r["cache"], cfg_parallel=False, _key=r["_key"])
        if one and r.get("cache_speedup") and one.get("cache_speedup"):
            r["retention"] = r["cache_speedup"] / one["cache_speedup"]
        if psnr and one:
            from runner.video import read_video

            values = []
            for index, path in r["_videos"].items():
                ref = one["_videos"].get(index)
                if ref and os.path.isfile(ref) and os.path.isfile(path):
                    values.append(math.inf if ref == path else _psnr(read_video(path), read_video(ref)))
            r["psnr_db"] = min(values) if values else None


def collect(study: str, psnr: bool = True) -> list[dict]:
    pdir = os.path.join(study, "points")
    if not os.path.isdir(pdir):
        raise FileNotFoundError(f"{study}: no points/ directory (run a sweep first: python -m runner.scaling dir={study})")
    rows = []
    for name in sorted(os.listdir(pdir)):
        if os.path.isfile(os.path.join(pdir, name, "point.json")):
            rows.append(summarize(*load_point(os.path.join(pdir, name))))
    relate(rows, psnr)
    rows.sort(key=lambda r: (r["cache"], r["layout"] != "-", r["layout"], r["cfg_parallel"], r["gpus"]))
    return rows


def environment(study: str) -> dict:
    """The hardware and software of the study's first report."""
    for root, _, files in os.walk(os.path.join(study, "points")):
        for f in sorted(files):
            if f.endswith(".json") and os.path.basename(root) == "out" and not f.startswith("."):
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    return json.load(fh).get("host", {})
    return {}


# ----------------------------------------------------------------------------- output


def _fmt(v, col: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if col in ("model_error",):
            return f"{v:+.1%}"
        if col in ("efficiency", "retention"):
            return f"{v:.2f}"
        if col == "bytes_per_computed_step":
            return f"{v / 1e6:.2f} MB" if v else "0"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _jsonable(v):
    return str(v) if isinstance(v, float) and (math.isinf(v) or math.isnan(v)) else v


def markdown(rows: list[dict], env: dict) -> str:
    cols = ["gpus", "layout", "cfg_parallel", "cache", "sampling_s", "e2e_s", "speedup", "efficiency", "cache_speedup",
            "retention", "computed_steps", "bytes_per_computed_step", "reused_step_collectives", "peak_mem_mb",
            "cores_per_rank", "psnr_db", "model_cores_per_rank", "predicted_s", "model_comm_s", "model_error"]
    names = {"cfg_parallel": "cfg", "sampling_s": "sampling s", "e2e_s": "end to end s", "cache_speedup": "cache x",
             "computed_steps": "computed", "bytes_per_computed_step": "bytes/rank/computed step",
             "reused_step_collectives": "collectives on reused steps", "peak_mem_mb": "peak MB/rank",
             "cores_per_rank": "cores/rank", "psnr_db": "PSNR vs 1 GPU", "model_cores_per_rank": "model cores/rank",
             "predicted_s": "model s", "model_comm_s": "model comm s",
             "model_error": "model error"}
    ok = [r for r in rows if r["status"] == "ok"]
    lines = []
    if env:
        lines.append(f"{env.get('device_name', '?')} ({env.get('device_type', '?')}, {env.get('cpu_cores', '?')} cores), "
                     f"torch {env.get('torch', '?')}" + (f", NCCL {env['nccl']}" if env.get("nccl") else "")
                     + f", {env.get('threads_per_rank', '?')} thread(s) per rank")
    if ok:
        lines.append(f"size {ok[0]['size']} (frames x height x width), {ok[0]['steps']} steps, medians of "
                     f"{ok[0]['videos']} video(s) per point after warm-up")
    lines += ["", "| " + " | ".join(names.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in ok:
        lines.append("| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"\n{r['point']}: **{r['status']}**: {r['error']}")
    return "\n".join(lines) + "\n"


def write(study: str, rows: list[dict], env: dict) -> list[str]:
    paths = [os.path.join(study, f"scaling.{ext}") for ext in ("csv", "json", "md")]
    with open(paths[0], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r.get(c), c) if isinstance(r.get(c), bool) else ("" if r.get(c) is None else r.get(c))
                        for c in COLUMNS])
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump({"environment": env, "rows": [{c: _jsonable(r.get(c)) for c in COLUMNS} for r in rows]}, f, indent=2)
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(markdown(rows, env))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.scaling report", description="A scaling study's table and plots.")
    ap.add_argument("dir", help="the study's directory (the sweep's dir=)")
    ap.add_argument("--comm", help="a communication fit (bench/collectives.py) for the cost model; default: "
                    "DIR/collectives/*.json when present")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-psnr", action="store_true", help="skip decoding the videos")
    args = ap.parse_args(argv)
    try:
        rows = collect(args.dir, psnr=not args.no_psnr)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = environment(args.dir)
    from runner.scaling import modelfit

    modelfit.annotate(args.dir, rows, env, args.comm)
    paths = write(args.dir, rows, env)
    if not args.no_plots:
        from runner.scaling import plots

        paths += plots.draw(args.dir, rows)
    print(markdown(rows, env))
    print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0
