"""Many consecutive real torchrun jobs of `runner.generate` on CPU (gloo): how often does one fail?

    python bench/stress_parallel.py 2:50 3:20                  # 50 jobs with parallel.sp=2, 20 with sp=3
    python bench/stress_parallel.py 2:10 --root /tmp/old-tree   # the same against another checkout
    python bench/stress_parallel.py 2:5 -- sampler.num_steps=3  # extra Hydra overrides after --
    python bench/stress_parallel.py 2:20 --pin 0                # every job on one core: races likelier

Each SPEC is K:N, N jobs of K processes with parallel.sp=K, one after another (a rare teardown race
shows only over many jobs: issue 13 was 1 job in 13). A job fails when it exits non-zero, when any
process printed "terminate called" (a C++ abort, even if the job's exit code hides it), when the
video or the report is missing, or when it runs past --timeout. Every job writes to a fresh output
directory (an existing video would be skipped as complete). The logs of failed jobs are kept under
--logs. Prints a dot per good job, a line per failed job, a summary line per SPEC and a final
table; exits 1 if any job failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["device=cpu", "progress=false", "sampler.num_steps=2", "prompt=a red circle moves left"]
LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run"], "skipsync": ["-m", "runner.launch"]}
KINDS = ("exit", "terminate", "missing", "timeout")


@dataclass
class Tally:
    sp: int
    runs: int = 0
    failed: int = 0
    kinds: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    codes: dict = field(default_factory=dict)  # non-zero exit code -> count
    seconds: list = field(default_factory=list)


def parse_spec(s: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:N (e.g. 2:50), got {s!r}") from None
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"K and N must be >= 1, got {s!r}")
    return k, n


def job_env(root: str, launcher: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if launcher == "torchrun":
        env.setdefault("OMP_NUM_THREADS", "1")  # runner.launch picks its own
    return env


def run_one(sp: int, root: str, out_dir: str, launcher: str, extra: list[str], timeout: float,
            pin: str | None = None) -> tuple[list[str], int | None, str, float]:
    """-> (failure kinds, exit code or None on timeout, combined output, seconds)."""
    cmd = ["taskset", "-c", pin] if pin else []
    cmd += [sys.executable, *LAUNCHERS[launcher], "--standalone", f"--nproc_per_node={sp}", "-m", "runner.generate",
           f"parallel.sp={sp}", *SMALL, f"output_dir={out_dir}", *extra]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=root, env=job_env(root, launcher), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        code = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        code = None
    seconds = time.monotonic() - t0
    kinds = []
    if code is None:
        kinds.append("timeout")
    elif code != 0:
        kinds.append("exit")
    if "terminate called" in out:
        kinds.append("terminate")
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if not (any(n.endswith(".mp4") for n in names) and any(n.endswith(".json") for n in names)):
        kinds.append("missing")
    return kinds, code, out, seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+", type=parse_spec, metavar="K:N", help="N jobs with parallel.sp=K")
    ap.add_argument("--root", default=ROOT, help="the checkout to run (default: this one)")
    ap.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun",
                    help="torch.distributed.run, or runner.launch (skipsync-torchrun)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per job before it counts as hung")
    ap.add_argument("--pin", metavar="CPUS", default=None,
                    help="run every job under `taskset -c CPUS` (e.g. 0): ranks, launcher and store share those "
                         "cores, which makes timing races at startup and teardown likelier")
    ap.add_argument("--logs", default=None, help="where failed jobs' logs go (default: a new temporary folder)")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    logs = args.logs or tempfile.mkdtemp(prefix="stress-logs-")
    os.makedirs(logs, exist_ok=True)
    pinned = f", pinned to CPUs {args.pin}" if args.pin else ""
    print(f"stress: root {root}, launcher {args.launcher}{pinned}, overrides {' '.join(SMALL + extra)}; failed logs in {logs}",
          flush=True)

    tallies = []
    for sp, n in args.specs:
        t = Tally(sp)
        tallies.append(t)
        for i in range(1, n + 1):
            work = tempfile.mkdtemp(prefix=f"stress-sp{sp}-")
            try:
                kinds, code, out, seconds = run_one(sp, root, os.path.join(work, "out"), args.launcher, extra,
                                                    args.timeout, args.pin)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            t.runs += 1
            t.seconds.append(seconds)
            if code not in (0, None):
                t.codes[code] = t.codes.get(code, 0) + 1
            if kinds:
                t.failed += 1
                for k in kinds:
                    t.kinds[k] += 1
                log = os.path.join(logs, f"sp{sp}-run{i}.log")
                with open(log, "w") as f:
                    f.write(out)
                print(f"\n  sp={sp} job {i}/{n}: FAILED ({', '.join(kinds)}; exit {code}) -> {log}", flush=True)
            else:
                print(".", end="", flush=True)  # progress: one dot per good job
        print("\n" + summary_line(t), flush=True)

    print()
    print(table(tallies))
    return 1 if any(t.failed for t in tallies) else 0


def summary_line(t: Tally) -> str:
    kinds = ", ".join(f"{k} {t.kinds[k]}" for k in KINDS)
    codes = ", ".join(f"{c}: {n}" for c, n in sorted(t.codes.items())) or "none"
    return (f"sp={t.sp}: {t.runs} jobs, {t.failed} failed ({kinds}); non-zero exit codes: {codes}; "
            f"median {statistics.median(t.seconds):.1f} s/job")


def table(tallies: list[Tally]) -> str:
    head = ["sp", "jobs", "failed", "rate", *KINDS, "median s"]
    rows = [[str(t.sp), str(t.runs), str(t.failed), f"{100 * t.failed / t.runs:.1f}%",
             *(str(t.kinds[k]) for k in KINDS), f"{statistics.median(t.seconds):.1f}"] for t in tallies]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


if __name__ == "__main__":
    sys.exit(main())
