"""Final latents of fixed generations, saved once and compared later: a refactor must not change them.

    python bench/latent_snapshot.py save DIR      # run every case, keep its final latent in DIR
    python bench/latent_snapshot.py compare DIR   # run again, print max |difference| per case (0 = identical)

Cases: the default generation (shipped demo model), parallel.sp=3 and parallel.cfg=2 (torchrun,
CPU, gloo), cache=adacache, pab246 and teacache; one fixed prompt and seed, one thread per process.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle moves left on a dark background"
CASES = {
    "default": (1, []),
    "sp3": (3, ["parallel.sp=3"]),
    "cfg2": (2, ["parallel.cfg=2"]),
    "adacache": (1, ["cache=adacache"]),
    "pab246": (1, ["cache=pab246"]),
    "teacache": (1, ["cache=teacache"]),
}


def run_case(name: str, out: str) -> torch.Tensor:
    nproc, overrides = CASES[name]
    args = [f"prompt={PROMPT}", "seed=7", "device=cpu", "progress=false", "save_latent=true", f"output_dir={out}",
            *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "runner.generate", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
    (latent,) = glob.glob(os.path.join(out, "*.latent.pt"))
    return torch.load(latent)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, directory = argv
    os.makedirs(directory, exist_ok=True)
    worst = 0.0
    for name in CASES:
        with tempfile.TemporaryDirectory() as out:
            latent = run_case(name, out)
        path = os.path.join(directory, f"{name}.pt")
        if mode == "save":
            torch.save(latent, path)
            print(f"{name:10s} saved {tuple(latent.shape)}")
        else:
            diff = (latent - torch.load(path)).abs().max().item()
            worst = max(worst, diff)
            print(f"{name:10s} max |diff| = {diff:.3g}")
    if mode == "compare":
        print(f"largest difference: {worst:.3g}")
        return 0 if worst == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
