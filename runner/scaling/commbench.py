"""Time all_to_all, all_gather and all_reduce over message sizes and fit latency and bandwidth.

    python -m runner.launch --standalone --nproc_per_node 4 -m runner.scaling.commbench --out commfit.json

Every rank joins one sp group of all ranks (parallel/mesh.py init_mesh: gloo on CPU, nccl on CUDA)
and runs the collectives through `parallel.comm.Comm`, so they are counted like the runner's. For
each op and size: a few warm-up runs, then `--reps` timed runs, each started after a barrier (with
torch.cuda.synchronize on CUDA); a run's time is the slowest rank's (a collective ends when its last
rank does), and the point is the median over runs. Rank 0 fits t = latency + bytes / bandwidth per
op (costmodel.fit_link, bytes = costmodel.byte_figure of the counted event: what crosses a rank's
link in its busier direction), writes the CommFit JSON with the raw points, and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from parallel.comm import Comm
from parallel.mesh import ParallelConfig, init_mesh
from runner.scaling.costmodel import Collective, CommFit, byte_figure, fit_link

OPS = ("all_to_all", "all_gather", "all_reduce")
SIZES = [4 << 10, 32 << 10, 256 << 10, 2 << 20, 16 << 20]  # bytes each rank contributes: 4 KiB .. 16 MiB


def _tensor(op: str, nbytes: int, p: int, device) -> torch.Tensor:
    """fp32 input of about `nbytes` (an all_to_all input needs a multiple of p rows)."""
    n = max(1, nbytes // 4)
    if op == "all_to_all":
        return torch.ones(p, max(1, n // p), device=device)
    return torch.ones(n, device=device)


def _run(comm: Comm, op: str, x: torch.Tensor) -> None:
    if op == "all_to_all":
        comm.all_to_all(x, "sp", scatter_dim=0, gather_dim=1, tag="bench")
    elif op == "all_gather":
        comm.all_gather(x, "sp", dim=0, tag="bench")
    else:
        comm.all_reduce(x, "sp", tag="bench")


def time_op(comm: Comm, op: str, nbytes: int, warmup: int, reps: int) -> dict:
    """One point: the median (and min) over reps of the slowest rank's time, and the counted bytes."""
    dev = comm.mesh.device
    cuda = dev.type == "cuda"
    x = _tensor(op, nbytes, comm.size("sp"), dev)
    times = []
    for i in range(warmup + reps):
        comm.barrier("sp", tag="bench-barrier")
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        _run(comm, op, x)
        if cuda:
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    e = next(e for e in reversed(comm.log.events) if e.op == op)
    c = Collective(op, e.group_size, e.bytes_out, e.bytes_remote, e.bytes_in, e.tag)
    slowest = torch.tensor(times, dtype=torch.float64, device=dev)
    comm.all_reduce(slowest, "sp", op="max", tag="bench-times")
    ts = slowest.tolist()
    comm.log.reset()  # the log would grow with every run
    return {"op": op, "size": nbytes, "bytes": c.bytes, "bytes_remote": c.bytes_remote, "bytes_in": c.bytes_in,
            "figure": byte_figure(c), "median_s": statistics.median(ts), "min_s": min(ts), "reps": len(ts)}


def fit_points(points: list[dict], p: int, meta: dict) -> CommFit:
    fit = CommFit(meta=meta)
    for op in sorted({x["op"] for x in points}):
        pts = [x for x in points if x["op"] == op]
        fit.links[op, p] = fit_link([x["figure"] for x in pts], [x["median_s"] for x in pts])
    return fit


def print_table(fit: CommFit, points: list[dict], p: int, file=sys.stdout) -> None:
    m = fit.meta
    print(f"commbench: P={p}, backend {m['backend']}, {m['threads']} thread(s) per rank, device {m['device']}",
          file=file)
    print(f"{'op':11} {'bytes':>10} {'link bytes':>11} {'median us':>10} {'min us':>9} {'GB/s':>7}", file=file)
    for x in points:
        print(f"{x['op']:11} {x['bytes']:>10} {x['figure']:>11} {x['median_s'] * 1e6:>10.1f} {x['min_s'] * 1e6:>9.1f} "
              f"{x['figure'] / x['median_s'] / 1e9:>7.3f}", file=file)
    for (op, n), f in sorted(fit.links.items()):
        print(f"fit {op} p={n}: latency {f.latency_s * 1e6:.1f} us, bandwidth {f.bandwidth_Bps / 1e9:.3f} GB/s",
              file=file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CommFit JSON, written by rank 0")
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="bytes each rank contributes")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="auto", help="auto: nccl with CUDA, gloo otherwise")
    args = ap.parse_args(argv)

    mesh = init_mesh(ParallelConfig(sp=-1, backend=args.backend))
    try:
        p = mesh.world_size
        if p < 2:
            print("commbench needs at least 2 processes (launch it with runner.launch / torchrun)", file=sys.stderr)
            return 2
        comm = Comm(mesh)
        points = [time_op(comm, op, n, args.warmup, args.reps) for op in args.ops for n in args.sizes]
        if mesh.rank == 0:
            meta = {"backend": mesh.backend, "world_size": p, "threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "device": str(mesh.device),
                    "torch": torch.__version__, "warmup": args.warmup, "points": points}
            if mesh.device.type == "cuda":
                meta["device_name"] = torch.cuda.get_device_name(mesh.device)
            fit = fit_points(points, p, meta)
            fit.save(args.out)
            print_table(fit, points, p)
    finally:
        mesh.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
