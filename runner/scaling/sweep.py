"""The sweep runner: the same work at several GPU counts, layouts and cache policies, one run each.

    python -m runner.scaling dir=study gpus=[1,2,4,8] caches=[none,adacache] model=demo repeats=3
    python -m runner.scaling report study        # the table and the plots (runner/scaling/table.py)

Every point is one `runner.generate` job of `warmup + repeats` copies of the prompts (the first
`warmup` videos are discarded by the report), started by the launcher:

    local   torchrun --standalone --nproc_per_node N (skipsync's, runner/launch.py) in a subprocess;
            gloo on CPU, NCCL on GPU. A point needing more GPUs than this machine has is refused.
    slurm   one Slurm job per point through submitit: nodes = ceil(N / gpus_per_node), one task per
            node running torchrun for that node's processes (slurm.executor=local|debug runs the
            same path without a cluster).

Point P writes under DIR/points/P/: command.txt (the exact command), log.txt, out/ (videos and
reports) and point.json (status ok | failed | timeout | refused, the error, the wall time). A rerun
skips the points that are complete and retries the others; a failing point never stops the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

from runner.config import CONF_DIR, UserError
from runner.launch import available_cores

LAUNCHERS = ("local", "slurm")


@dataclass
class SlurmSettings:
    partition: Optional[str] = None
    gpus_per_node: int = 8  # processes per node (one per GPU); CPU clusters: the ranks per node
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 60
    # submitit's executor: slurm (a real cluster), local (subprocesses) or debug (in this process)
    executor: str = "slurm"
    # request GPUs from Slurm (--gpus-per-node); false on CPU clusters
    request_gpus: bool = True


@dataclass
class ScalingConfig:
    dir: str = "scaling"  # the study's directory: points/, table, plots
    gpus: list = field(default_factory=lambda: [1, 2, 4, 8])
    layouts: list = field(default_factory=lambda: ["dsp", "ulysses"])
    caches: list = field(default_factory=lambda: ["none", "adacache"])
    # true adds CFG-parallel points (parallel.cfg=2, sp = N/2) where N is even
    cfg_parallel: list = field(default_factory=lambda: [False])
    model: str = "demo"  # conf/model/<name>
    preset: Optional[str] = None  # conf/preset/<name>, e.g. 480p-2s (instead of height/width/frames)
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    steps: int = 30
    prompts: list = field(default_factory=lambda: ["a red circle moves left on a dark background"])
    repeats: int = 3
    warmup: int = 1
    seed: int = 42
    device: str = "auto"
    threads_per_rank: int = 1  # OMP threads per process (CPU); GPUs: the data loaders' only
    launcher: str = "local"
    timeout_s: float = 3600.0  # per point
    # local launcher: time the collectives at every process count first (runner/scaling/commbench.py,
    # DIR/collectives/pN.json), so that the report's cost model has this machine's latency and bandwidth
    measure_comm: bool = True
    overrides: list = field(default_factory=list)  # more runner.generate overrides, for every point
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="scaling_schema", node=ScalingConfig)


@dataclass(frozen=True)
class Point:
    gpus: int
    layout: Optional[str]  # None: one sequence-parallel rank (nothing to lay out)
    cache: str
    cfg_parallel: bool = False

    @property
    def sp(self) -> int:
        return self.gpus // 2 if self.cfg_parallel else self.gpus

    @property
    def id(self) -> str:
        return f"n{self.gpus}-{self.layout or 'sp1'}-{self.cache}" + ("-cfg2" if self.cfg_parallel else "")


def model_heads(model: str) -> int:
    """The attention heads of conf/model/<model>.yaml's architecture (Ulysses needs heads % sp == 0)."""
    from runner.cache.base import NoCacheConfig
    from runner.config import Config
    from runner.estimate import architecture

    path = os.path.join(CONF_DIR, "model", f"{model}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".yaml"))
        raise UserError(f"model={model!r} is not in conf/model; use one of: {', '.join(names)}.")
    group = OmegaConf.load(path)  # a `_global_` package: top-level keys of Config
    base = OmegaConf.structured(Config(cache=NoCacheConfig()))
    return architecture(OmegaConf.to_object(OmegaConf.merge(base, group))).num_heads


def points(cfg: ScalingConfig) -> tuple[list[Point], list[str]]:
    """The sweep's points, and a note for each combination left out (why)."""
    heads, out, skipped = model_heads(cfg.model), [], []
    for n in cfg.gpus:
        for cfgp in cfg.cfg_parallel:
            if cfgp and n % 2:
                skipped.append(f"{n} GPUs with CFG-parallel: needs an even count")
                continue
            sp = n // 2 if cfgp else n
            layouts = [None] if sp == 1 else cfg.layouts
            for layout in layouts:
                if layout == "ulysses" and heads % sp:
                    skipped.append(f"{n} GPUs, ulysses: {heads} heads do not split over sp={sp}")
                    continue
                out.extend(Point(n, layout, cache, bool(cfgp)) for cache in cfg.caches)
    return out, sorted(set(skipped))


def check(cfg: ScalingConfig) -> None:
    problems = []
    if cfg.launcher not in LAUNCHERS:
        problems.append(f"launcher={cfg.launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if not cfg.gpus or any(not isinstance(n, int) or n < 1 for n in cfg.gpus):
        problems.append(f"gpus={list(cfg.gpus)}: give whole numbers >= 1, e.g. gpus=[1,2,4]")
    if cfg.repeats < 1 or cfg.warmup < 0:
        problems.append(f"repeats={cfg.repeats}, warmup={cfg.warmup}: need repeats >= 1 and warmup >= 0")
    if cfg.steps < 1:
        problems.append(f"steps={cfg.steps}: need >= 1")
    if not cfg.prompts:
        problems.append("prompts is empty")
    if any("\n" in str(p) for p in cfg.prompts):
        problems.append("a prompt contains a line break (prompts are written one per line)")
    bad = [x for x in cfg.layouts if x not in ("dsp", "ulysses")]
    if bad:
        problems.append(f"layouts: {bad} not known; use dsp, ulysses")
    bad = [c for c in cfg.caches if not os.path.isfile(os.path.join(CONF_DIR, "cache", f"{c}.yaml"))]
    if bad:
        problems.append(f"caches: {bad} are not in conf/cache")
    if problems:
        raise UserError("scaling: " + "; ".join(problems) + ".")


# ----------------------------------------------------------------------------- one point


def generate_overrides(cfg: ScalingConfig, point: Point, prompts_file: str, out_dir: str) -> list[str]:
    ov = [f"model={cfg.model}"]
    if cfg.preset:
        ov.append(f"preset={cfg.preset}")
    ov += [f"{k}={getattr(cfg, k)}" for k in ("height", "width", "num_frames") if getattr(cfg, k) is not None]
    ov += [f"sampler.num_steps={cfg.steps}", f"cache={point.cache}", f"parallel.sp={point.sp}",
           f"parallel.cfg={2 if point.cfg_parallel else 1}", f"parallel.layout={point.layout or 'dsp'}",
           f"prompts_file={prompts_file}", f"seed={cfg.seed}", f"output_dir={out_dir}", f"device={cfg.device}",
           "progress=false"]
    return ov + list(cfg.overrides)


def torchrun_command(nproc: int, overrides: list[str], nnodes: int = 1, rdzv: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "runner.launch"]
    if nnodes == 1:
        cmd += ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}"]
    return cmd + ["-m", "runner.generate", *overrides]


def run_command(cmd: list[str], env: dict, log_path: str, timeout_s: float) -> tuple[int | None, float]:
    """Run cmd with its output in log_path; -> (exit code or None on timeout, wall seconds). The
    process group is ended on a timeout (torchrun and every rank)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            return None, time.perf_counter() - t0
        except BaseException:  # Ctrl-C of the sweep: do not leave the point's ranks behind
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise


def last_error(log_path: str, lines: int = 4) -> str:
    """The last lines of a failed point's log that say what went wrong."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = [x.rstrip() for x in f if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in text if x.startswith(("error", "Error")) or "Error:" in x]
    return " | ".join((errors or text)[-lines:])[-1000:]


def slurm_job(nproc_per_node: int, nnodes: int, overrides: list[str], env: dict, log_path: str,
              timeout_s: float) -> int | None:
    """What a Slurm task runs for one point (one task per node): torchrun for this node's ranks,
    meeting the other nodes at a c10d rendezvous on the job's first node."""
    rdzv = None
    if nnodes > 1:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        rdzv = f"{hosts[0]}:{20000 + int(os.environ['SLURM_JOB_ID']) % 20000}"
        log_path = f"{log_path}.node{os.environ.get('SLURM_NODEID', '0')}"
    code, _ = run_command(torchrun_command(nproc_per_node, overrides, nnodes, rdzv), {**os.environ, **env},
                          log_path, timeout_s)
    return code


# ----------------------------------------------------------------------------- the sweep


class Sweep:
    def __init__(self, cfg: ScalingConfig):
        check(cfg)
        self.cfg = cfg
        self.dir = os.path.abspath(cfg.dir)
        self.points, self.skipped = points(cfg)
        self.videos = (cfg.warmup + cfg.repeats) * len(cfg.prompts)

    def point_dir(self, p: Point) -> str:
        return os.path.join(self.dir, "points", p.id)

    def complete(self, p: Point) -> bool:
        """ok in point.json, with every report it names still there."""
        try:
            with open(os.path.join(self.point_dir(p), "point.json"), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return False
        out = os.path.join(self.point_dir(p), "out")
        reports = [f for f in os.listdir(out) if f.endswith(".json")] if os.path.isdir(out) else []
        return rec.get("status") == "ok" and len(reports) >= self.videos

    def write_prompts(self) -> str:
        path = os.path.join(self.dir, "prompts.txt")
        lines = [p for _ in range(self.cfg.warmup + self.cfg.repeats) for p in self.cfg.prompts]
        with open(path, "w", encoding="utf-8") as f:
            f.write("# written by runner.scaling: (warmup + repeats) copies of the prompts\n")
            f.write("".join(f"{x}\n" for x in lines))
        return path

    def env(self) -> dict:
        return {"OMP_NUM_THREADS": str(self.cfg.threads_per_rank), "PYTHONUNBUFFERED": "1"}

    def machine_gpus(self) -> int | None:
        """GPUs this machine has for the local launcher (None: a CPU run, processes share cores)."""
        import torch

        if self.cfg.device == "cpu" or (self.cfg.device == "auto" and not torch.cuda.is_available()):
            return None
        return torch.cuda.device_count()

    def record(self, p: Point, **rec) -> dict:
        rec = {"id": p.id, **dataclasses.asdict(p), "sp": p.sp, "warmup_videos": self.cfg.warmup * len(self.cfg.prompts),
               "videos": self.videos, "launcher": self.cfg.launcher, **rec}
        os.makedirs(self.point_dir(p), exist_ok=True)
        tmp = os.path.join(self.point_dir(p), "point.json.partial")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=2)
        os.replace(tmp, os.path.join(self.point_dir(p), "point.json"))
        return rec

    def run(self) -> list[dict]:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "sweep.yaml"), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        prompts_file = self.write_prompts()
        for note in self.skipped:
            say(f"left out: {note}")
        todo = [p for p in self.points if not self.complete(p)]
        for p in self.points:
            if p not in todo:
                say(f"skip {p.id}: complete")
        gpus = self.machine_gpus() if self.cfg.launcher == "local" else None
        if gpus is None and self.cfg.launcher == "local":
            cores = available_cores()
            if any(p.gpus * self.cfg.threads_per_rank > cores for p in todo):
                say(f"note: this machine has {cores} cores; points with more processes x threads share them "
                    "(the table shows the cores each rank had)")
        if self.cfg.launcher == "local" and self.cfg.measure_comm:
            self.measure_comm(sorted({p.gpus for p in todo if p.gpus > 1 and (gpus is None or p.gpus <= gpus)}))
        launch = self._run_local if self.cfg.launcher == "local" else self._run_slurm
        return launch(todo, prompts_file, gpus)

    def measure_comm(self, counts: list[int]) -> None:
        """This machine's collective latency and bandwidth at each process count (kept across reruns)."""
        d = os.path.join(self.dir, "collectives")
        os.makedirs(d, exist_ok=True)
        for n in counts:
            out = os.path.join(d, f"p{n}.json")
            if os.path.isfile(out):
                continue
            cmd = [sys.executable, "-m", "runner.launch", "--standalone", f"--nproc_per_node={n}", "-m",
                   "runner.scaling.commbench", "--out", out]
            code, wall = run_command(cmd, {**os.environ, **self.env()}, os.path.join(d, f"p{n}.log"),
                                     min(self.cfg.timeout_s, 600))
            say(f"collectives at {n} processes: " + ("measured" if code == 0 else
                f"not measured ({last_error(os.path.join(d, f'p{n}.log'))})") + f" in {wall:.1f} s")

    def _progress(self, i: int, n: int, rec: dict) -> None:
        extra = f": {rec['error']}" if rec.get("error") else ""
        say(f"[{i}/{n}] {rec['id']}: {rec['status']} in {rec.get('wall_s', 0):.1f} s{extra}")

    def _prepare(self, p: Point, prompts_file: str) -> list[str]:
        d = self.point_dir(p)
        os.makedirs(d, exist_ok=True)
        return generate_overrides(self.cfg, p, prompts_file, os.path.join(d, "out"))

    def _run_local(self, todo: list[Point], prompts_file: str, gpus: int | None) -> list[dict]:
        recs = []
        for i, p in enumerate(todo, 1):
            ov = self._prepare(p, prompts_file)
            cmd = torchrun_command(p.gpus, ov)
            with open(os.path.join(self.point_dir(p), "command.txt"), "w", encoding="utf-8") as f:
                f.write(" ".join(f"{k}={v}" for k, v in self.env().items()) + " " + shlex.join(cmd) + "\n")
            if gpus is not None and p.gpus > gpus:
                rec = self.record(p, status="refused", error=f"needs {p.gpus} GPUs; this machine has {gpus} "
                                  "(launcher=slurm runs points larger than one machine)", wall_s=0.0)
            else:
                code, wall = run_command(cmd, {**os.environ, **self.env()}, os.path.join(self.point_dir(p), "log.txt"),
                                         self.cfg.timeout_s)
                rec = self._finish(p, code, wall)
            recs.append(rec)
            self._progress(i, len(todo), rec)
        return recs

    def _finish(self, p: Point, code: int | None, wall: float) -> dict:
        log = os.path.join(self.point_dir(p), "log.txt")
        if code is None:
            return self.record(p, status="timeout", error=f"no result within timeout_s={self.cfg.timeout_s:g}",
                               wall_s=round(wall, 3))
        if code != 0:
            return self.record(p, status="failed", returncode=code, error=last_error(log), wall_s=round(wall, 3))
        return self.record(p, status="ok", returncode=0, wall_s=round(wall, 3))

    def _run_slurm(self, todo: list[Point], prompts_file: str, gpus: int | None) -> list[dict]:
        import submitit

        s = self.cfg.slurm
        cluster = None if s.executor == "slurm" else s.executor
        jobs = []
        for p in todo:
            ov = self._prepare(p, prompts_file)
            per_node = min(p.gpus, s.gpus_per_node)
            nodes = -(-p.gpus // s.gpus_per_node)
            if p.gpus % per_node:
                rec = self.record(p, status="refused", error=f"{p.gpus} GPUs do not fill whole nodes of "
                                  f"{s.gpus_per_node}", wall_s=0.0)
                self._progress(len(jobs), len(todo), rec)
                continue
            ex = submitit.AutoExecutor(folder=os.path.join(self.point_dir(p), "slurm"), cluster=cluster)
            params = {"timeout_min": s.timeout_min, "nodes": nodes, "tasks_per_node": 1, "cpus_per_task": s.cpus_per_task,
                      "mem_gb": s.mem_gb, "name": f"skipsync-{p.id}"}
            if s.partition:
                params["slurm_partition"] = s.partition
            if s.request_gpus and cluster is None:
                params["gpus_per_node"] = per_node
            ex.update_parameters(**params)
            with open(os.path.join(self.point_dir(p), "command.txt"), "w", encoding="utf-8") as f:
                f.write(f"# Slurm: {nodes} node(s) x {per_node} process(es), one task per node runs:\n")
                f.write(shlex.join(torchrun_command(per_node, ov, nodes, "FIRST_NODE:PORT")) + "\n")
            t0 = time.perf_counter()
            job = ex.submit(slurm_job, per_node, nodes, ov, self.env(), os.path.join(self.point_dir(p), "log.txt"),
                            self.cfg.timeout_s)
            say(f"submitted {p.id}: job {job.job_id}")
            jobs.append((p, job, t0))
        recs = []
        for i, (p, job, t0) in enumerate(jobs, 1):
            # Wait with a deadline: without Slurm accounting (sacct) submitit may never see a failed
            # job end. The deadline counts the time queued too.
            deadline = t0 + self.cfg.timeout_s + 60 * s.timeout_min
            while not job.done() and time.perf_counter() < deadline:
                time.sleep(1.0)
            if not job.done():
                job.cancel(check=False)
                rec = self.record(p, status="timeout", error=f"job {job.job_id} did not end within timeout_s + "
                                  "slurm.timeout_min; cancelled", wall_s=round(time.perf_counter() - t0, 3))
                recs.append(rec)
                self._progress(i, len(jobs), rec)
                continue
            try:
                codes = job.results() if hasattr(job, "results") else [job.result()]
                code = next((c for c in codes if c != 0), 0)
                rec = self._finish(p, code, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - a job that Slurm or submitit failed is a failed point
                rec = self.record(p, status="failed", error=f"{type(e).__name__}: {str(e).strip()[-800:]}",
                                  wall_s=round(time.perf_counter() - t0, 3))
            recs.append(rec)
            self._progress(i, len(jobs), rec)
        return recs


def say(msg: str) -> None:
    print(f"scaling: {msg}", file=sys.stderr, flush=True)
