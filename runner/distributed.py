"""The runner's side of distributed generation: mesh, layout, sharded loop, prompt groups, faults.

`runner.generate` drives one `Parallel` object per job (a single process without torchrun gets a
world of one, where every piece below is an identity):

    par = setup(cfg)                        # mesh from the torchrun env + cfg.parallel; watchdog
    ... validate, read prompts, build the pipeline (local, no collective) ...
    par.prepare(pipe, cfg, prompts, stem)   # layout + shape checks, then the first collective
    for index, prompt in enumerate(prompts):
        if not par.owns(index): continue    # another dp group's prompt, or already complete
        run = par.start(z, cond, cfg_scale) # this rank's latent band and CFG half
        sample(model_fn(rows=run.rows), run.z, ..., on_step=run.on_step, cfg_combine=run.cfg_combine)
        z = run.assemble(z)                 # the one all_gather, after the last step
        info = par.report()                 # every rank's per-step collectives, for the leader's report
    par.close()

Layout of the work: prompt i goes to dp group i % dp (seed = seed + i whatever the group count);
inside a group the cfg ranks split the CFG pair (cond on cfg rank 0, null on 1) and the sp ranks
split the latent by patch rows. The latent stays sharded through the loop; with cfg=2 the only
collective outside the layout's is the exchange of the velocity band inside the CFG pair. The
group leader (lowest rank) decodes and writes the video and the report.

Faults (`exit_on_error`, called by the CLI): inputs are validated on every rank before the first
collective; a rank that fails claims the failure in the rendezvous store, prints the error (once: only
the first failing rank prints it), and leaves with os._exit (2 for bad input, 1 otherwise). The others
stop within the collective timeout: a collective with a dead peer fails at once or times out, and the
watchdog (parallel/watchdog.py) stops ranks that are not waiting on the failed one.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from models.loading import CheckpointError
from parallel.comm import Comm, split_range
from parallel.layouts import LAYOUTS, SequenceParallel, parallelize
from parallel.mesh import Mesh, ParallelConfig, init_mesh, launch_env
from parallel.shard import RowShard, row_shard
from parallel.watchdog import Watchdog, _exit
from runner.cli import Interrupted
from runner.config import Config, UserError
from runner.sampler import guidance

_ACTIVE: "Parallel | None" = None  # the job's Parallel, for exit_on_error


@dataclass
class Run:
    """One generation on this rank: what the sampler and the model get."""

    z: torch.Tensor  # this rank's band of the noise
    y: torch.Tensor  # the caption embedding(s) this rank runs: [cond; null], or one half with cfg=2
    mask: torch.Tensor
    rows: tuple[int, int] | None  # the model's rows= (None: the whole latent)
    cfg_combine: Callable[[torch.Tensor], torch.Tensor] | None
    on_step: Callable[[int, str], None]
    assemble: Callable[[torch.Tensor], torch.Tensor]


class Parallel:
    def __init__(self, mesh: Mesh, comm: Comm, layout: str = "dsp", watchdog: Watchdog | None = None,
                 timeout_s: float = 300.0):
        self.mesh, self.comm, self.layout, self.watchdog = mesh, comm, layout, watchdog
        self.timeout_s = timeout_s
        self.sp: SequenceParallel | None = None
        self.todo: set[int] | None = None  # prompt indices this rank runs (None: all; before prepare)

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def is_writer(self) -> bool:
        """The group leader: decodes, writes the video and the report."""
        return self.mesh.is_group_leader

    # ------------------------------------------------------------------ before the loop
    def prepare(self, pipe, cfg: Config, prompts: list[str], complete: Callable[[int], bool],
                name: Callable[[int], str]) -> None:
        """Install the layout and check the shapes (local: UserError on any rank), then run the
        first collective: the group leader's list of videos that already exist complete
        (`complete(i)`, runner.outputs.is_complete; `name(i)`: the video's name, for the message)."""
        try:
            self.sp = parallelize(pipe.dit, self.mesh, self.comm, self.layout)
            row_shard(pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width), pipe.dit.config.patch_size,
                      self.mesh.sp, self.mesh.sp_rank)
        except ValueError as e:
            raise UserError(f"parallel: {e}.") from None
        mine = [i for i in range(len(prompts)) if i % self.mesh.dp == self.mesh.dp_rank]
        done = None
        if self.is_writer:
            done = [i for i in mine if complete(i)]
        with self.comm.log.in_phase("startup"):
            done = self.comm.all_gather_object(done, "agree", tag="resume")[0]  # the leader's view
        if self.is_writer:
            for i in done:
                print(f"skip {name(i)}: video and report exist (resume)", file=sys.stderr)
        self.todo = set(mine) - set(done)

    def owns(self, index: int) -> bool:
        """Whether this rank works on prompt `index` (its dp group's, and not complete already)."""
        return self.todo is None or index in self.todo

    # ------------------------------------------------------------------ one generation
    def start(self, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cfg_scale: float) -> Run:
        """This rank's share of one generation from the full noise z (the same on every rank of the
        group) and the conditioning y = [cond; null] (2B, L, C)."""
        log = self.comm.log
        log.reset()
        shard: RowShard | None = None
        if self.sp is not None and self.sp.size > 1:
            shard = self.sp.shard(z.shape)
            z = shard.slice(z).clone()
        cfg_combine = None
        if self.mesh.cfg == 2:
            y = y.chunk(2)[self.mesh.cfg_rank]  # cond on cfg rank 0, null on cfg rank 1

            def cfg_combine(v: torch.Tensor) -> torch.Tensor:
                both = self.comm.all_gather(v.contiguous(), "cfg", dim=0, tag="cfg")  # [cond; uncond] bands
                v_cond, v_uncond = both.chunk(2)
                return guidance(v_cond, v_uncond, cfg_scale)

        def on_step(i: int, phase: str) -> None:
            log.set_step(i if phase == "start" else None)

        def assemble(band: torch.Tensor) -> torch.Tensor:
            if shard is None:
                return band
            with log.in_phase("assemble"):
                return shard.assemble(band, self.comm)

        return Run(z, y, mask, shard.rows if shard else None, cfg_combine, on_step, assemble)

    def decode(self, pipe, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Video (B, 3, num_frames, H, W) from the full latent z, which every rank of the prompt's
        group (cfg x sp) holds: each rank decodes a contiguous run of the pipeline's independent
        chunks and one all_gather assembles the frames, in order, on every rank of the group."""
        n = self.comm.size("agree")
        if n == 1:
            return pipe.decode(z, num_frames)
        chunks = pipe.chunks(num_frames)
        runs = [split_range(len(chunks), n, r) for r in range(n)]
        counts = [sum(c.num_frames for c in chunks[a:b]) for a, b in runs]
        start, stop = runs[self.comm.rank("agree")]
        if stop > start:
            mine = pipe.decode_chunks(z, num_frames, range(start, stop)).float()
        else:  # more ranks than chunks: nothing to decode, still part of the gather
            mine = z.new_zeros((z.shape[0], 3, 0, *pipe.frame_size(z)), dtype=torch.float32)
        with self.comm.log.in_phase("decode"):
            return self.comm.all_gather(mine.contiguous(), "agree", dim=2, sizes=counts, tag="decode")

    def report(self) -> dict:
        """For the run report: the mesh, the layout, and every rank's collectives per step (a
        collective over the group, after the loop; its own cost is not in the per-step lists)."""
        log = self.comm.log
        summary = log.summary()
        mine = {"rank": self.mesh.rank, "dp_rank": self.mesh.dp_rank, "cfg_rank": self.mesh.cfg_rank,
                "sp_rank": self.mesh.sp_rank, "per_step": {str(k): v for k, v in log.per_step().items()},
                "outside_steps": {"by_phase": _phases_outside_steps(log), **summary["outside_steps"]}}
        if self.sp is not None and self.sp.geometry is not None and self.sp.size > 1:
            g = self.sp.geometry
            start, total = g.rows
            mine["band"] = {"patch_rows": [start, start + g.row_sizes[g.rank]], "of_patch_rows": total,
                            "latent_rows": list(g.latent_range())}
        with log.in_phase("report"):
            ranks = self.comm.all_gather_object(mine, "agree", tag="report")
        mesh = {k: v for k, v in self.mesh.describe().items() if not k.endswith("rank")}
        return {"mesh": mesh, "layout": self.layout if self.mesh.sp > 1 else None, "collectives_per_rank": ranks}

    def close(self) -> None:
        global _ACTIVE
        # The watchdog first: finish() joins its thread, which must not still be inside a store call
        # while the process group and then the interpreter are torn down (SIGABRT at exit, issue 13).
        if self.watchdog is not None:
            self.watchdog.finish()
            self.watchdog = None
        self.mesh.destroy()
        if _ACTIVE is self:
            _ACTIVE = None


def _phases_outside_steps(log) -> dict:
    out: dict[str, dict] = {}
    for e in log.events:
        if e.step is None:
            acc = out.setdefault(e.phase, {"count": 0, "bytes": 0})
            acc["count"] += 1
            acc["bytes"] += e.bytes_out
    return out


def local() -> Parallel:
    """A world of one: no process group, no communication."""
    mesh = Mesh.layout(0, 1, 1, 1, 1)
    return Parallel(mesh, Comm(mesh))


def setup(cfg: Config) -> Parallel:
    """The job's mesh from the launch environment and cfg.parallel (no collective yet)."""
    global _ACTIVE
    s = cfg.parallel
    if s.layout not in LAYOUTS:
        raise UserError(f"parallel.layout={s.layout!r} is not known; use one of: {', '.join(LAYOUTS)}.")
    if not s.timeout_s > 0:
        raise UserError(f"parallel.timeout_s must be > 0 seconds (got {s.timeout_s}).")
    backend = s.backend
    if backend == "auto" and cfg.device == "cpu":
        backend = "gloo"  # CPU tensors on a CUDA machine
    try:
        mesh = init_mesh(ParallelConfig(dp=s.dp, cfg=s.cfg, sp=s.sp, backend=backend, timeout_s=s.timeout_s))
    except ValueError as e:
        raise UserError(f"parallel: {e}.") from None
    watchdog = None
    if mesh.is_distributed:
        watchdog = Watchdog.connect(mesh.rank, mesh.world_size, s.timeout_s)
        if watchdog is not None:
            watchdog.start()
    _ACTIVE = Parallel(mesh, Comm(mesh), s.layout, watchdog, s.timeout_s)
    return _ACTIVE


# ---------------------------------------------------------------------- faults

EXPECTED = (UserError, CheckpointError)  # bad input: one paragraph, exit code 2, no traceback


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _in_collective(e: BaseException) -> bool:
    """Raised inside a collective (a peer died or timed out), not by this rank's own work."""
    suffix = os.path.join("parallel", "comm.py")
    return any(f.filename.endswith(suffix) for f in traceback.extract_tb(e.__traceback__))


def exit_on_error(e: BaseException, expected: tuple = EXPECTED) -> None:
    """The CLI's handler for an exception out of `generate`.

    Single process: bad input (`expected`) prints `error: ...` and exits 2; a stop signal
    (`Interrupted`) prints one line and exits 128 + the signal; anything else is re-raised (a
    normal traceback). Before the mesh exists the error is the same on every rank (it depends only
    on the command line and world size): rank 0 prints it, all exit 2.
    Distributed: the first rank to fail prints the error (a traceback unless it is bad input or a
    signal) and every failing rank leaves at once with os._exit, 2 for bad input, 128 + the signal
    for a signal, 1 otherwise.
    """
    par = _ACTIVE
    is_expected = isinstance(e, expected)
    if isinstance(e, Interrupted):
        rank = par.mesh.rank if par is not None else launch_env()[0]
        where = f"[rank {rank}] " if par is not None and par.mesh.is_distributed else ""
        print(f"stopped: {where}{e.name} received; no partial file is left, finished videos are kept "
              "(run the same command again to resume)", file=sys.stderr)
        if par is not None and par.watchdog is not None:
            par.watchdog.claim_failure()
        _exit(e.exit_code)
    if par is None or not par.mesh.is_distributed:
        if not is_expected:
            raise e
        rank, world, _ = launch_env()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        if world > 1:
            _exit(2)
        sys.exit(2)
    rank = par.mesh.rank
    first = par.watchdog.claim_failure() if par.watchdog is not None else rank
    if first != rank:
        print(f"[rank {rank}] stopping: rank {first} failed ({type(e).__name__} here)", file=sys.stderr)
    elif is_expected:
        print(f"error: [rank {rank}] {e}", file=sys.stderr)
    elif _in_collective(e):
        print(f"error: [rank {rank}] a collective failed: {_first_line(e)} (another rank crashed, was killed, "
              f"or stalled longer than parallel.timeout_s={par.timeout_s:g} s)", file=sys.stderr)
    else:
        print(f"error: [rank {rank}] " + "".join(traceback.format_exception(e)), file=sys.stderr, end="")
    _exit(2 if is_expected else 1)
