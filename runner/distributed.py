"""The parallel job: the mesh, the layout's lifecycle, prompt groups and one sharded generation.

`runner.generate` drives one `Parallel` object per job (a single process without torchrun gets a
world of one, where every piece below is an identity); the assembly (runner/assemble.py) applies
the layout:

    par = setup(cfg)                        # mesh from the torchrun env + cfg.parallel; watchdog
    ... validate, read prompts, assemble (build, load, par.apply_layout, cache policy) ...
    par.skip_complete(prompts, complete)    # the first collective: the videos already done (resume)
    for index, prompt in enumerate(prompts):
        if not par.owns(index): continue    # another dp group's prompt, or already complete
        run = par.start(z, cond, cfg_scale) # this rank's latent band and CFG half (a ShardedRun)
        sample(model_fn(rows=run.rows), run.z, ..., on_step=run.on_step, cfg_combine=run.cfg_combine)
        z = run.assemble(z)                 # the one all_gather, after the last step
        info = par.report()                 # every rank's per-step collectives, for the leader's report
    par.close()

Layout of the work: prompt i goes to dp group i % dp (seed = seed + i whatever the group count);
inside a group the cfg ranks split the CFG pair (cond on cfg rank 0, null on 1) and the sp ranks
split the latent by patch rows. The latent stays sharded through the loop; with cfg=2 the only
collective outside the layout's is the exchange of the velocity band inside the CFG pair. The
group leader (lowest rank) decodes and writes the video and the report. What happens when a rank
fails is runner/faults.py.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch

from parallel.comm import Comm, split_range
from parallel.layouts import LAYOUTS, SequenceParallel, parallelize
from parallel.mesh import Mesh, init_mesh
from parallel.shard import RowShard, row_shard
from parallel.stop import StopAgreement
from parallel.watchdog import Watchdog, connect_store
from runner.config import Config, UserError
from runner.sampler import guidance



class ShardedRun:
    """One generation on this rank: its band of the latent, its CFG half, and what the sampler calls."""

    def __init__(self, par: "Parallel", z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cfg_scale: float):
        self.par, self.log, self.cfg_scale = par, par.comm.log, cfg_scale
        self.log.reset()
        self.shard: RowShard | None = None
        if par.layout is not None and par.layout.size > 1:
            self.shard = par.layout.shard(z.shape)
            z = self.shard.slice(z).clone()
        self.z, self.mask = z, mask  # this rank's band of the noise
        # the caption embedding(s) this rank runs: [cond; null], or one half with cfg=2
        self.y = y.chunk(2)[par.mesh.cfg_rank] if par.mesh.cfg == 2 else y
        self.rows = self.shard.rows if self.shard else None  # the model's rows= (None: the whole latent)
        # With cfg=2 the sampler combines the halves through the exchange below, else itself.
        self.cfg_combine = self._exchange_halves if par.mesh.cfg == 2 else None

    def band(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's band of a full-size latent-shaped tensor (noise drawn alike on every rank)."""
        return full if self.shard is None else self.shard.slice(full)

    def _exchange_halves(self, v: torch.Tensor) -> torch.Tensor:
        both = self.par.comm.all_gather(v.contiguous(), "cfg", dim=0, tag="cfg")  # [cond; uncond] bands
        v_cond, v_uncond = both.chunk(2)
        return guidance(v_cond, v_uncond, self.cfg_scale)

    def on_step(self, i: int, phase: str) -> None:
        self.log.set_step(i if phase == "start" else None)

    def assemble(self, band: torch.Tensor) -> torch.Tensor:
        """The full latent from every rank's band: the one all_gather, after the last step."""
        if self.shard is None:
            return band
        with self.log.in_phase("assemble"):
            return self.shard.assemble(band, self.par.comm)


class Parallel:
    def __init__(self, mesh: Mesh, comm: Comm, layout_name: str = "dsp", watchdog: Watchdog | None = None,
                 timeout_s: float = 300.0):
        self.mesh, self.comm, self.layout_name, self.watchdog = mesh, comm, layout_name, watchdog
        self.timeout_s = timeout_s
        self.layout: SequenceParallel | None = None  # installed by apply_layout (the assembly)
        self.todo: set[int] | None = None  # prompt indices this rank runs (None: all; before skip_complete)

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def is_writer(self) -> bool:
        """The group leader: decodes, writes the video and the report."""
        return self.mesh.is_group_leader

    # ------------------------------------------------------------------ before the loop
    def apply_layout(self, pipe, cfg: Config) -> SequenceParallel:
        """Install the sequence-parallel layout on pipe.dit and check that the video's shape can be
        split (local, no collective: a UserError here is the same on every rank)."""
        try:
            self.layout = parallelize(pipe.dit, self.mesh, self.comm, self.layout_name)
            row_shard(pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width), pipe.dit.config.patch_size,
                      self.mesh.sp, self.mesh.sp_rank)
        except ValueError as e:
            raise UserError(f"parallel: {e}.") from None
        return self.layout

    def skip_complete(self, num_prompts: int, complete: Callable[[int], bool], name: Callable[[int], str]) -> None:
        """The first collective: the group leader's list of its prompts whose videos already exist
        complete (`complete(i)`, runner.outputs.is_complete; `name(i)` for the message)."""
        mine = [i for i in range(num_prompts) if i % self.mesh.dp == self.mesh.dp_rank]
        done = [i for i in mine if complete(i)] if self.is_writer else None
        with self.comm.log.in_phase("startup"):
            done = self.comm.all_gather_object(done, "agree", tag="resume")[0]  # the leader's view
        if self.is_writer:
            for i in done:
                print(f"skip {name(i)}: video and report exist (resume)", file=sys.stderr)
        self.todo = set(mine) - set(done)

    def owns(self, index: int) -> bool:
        """Whether this rank works on prompt `index` (its dp group's, and not complete already)."""
        return self.todo is None or index in self.todo

    def stop_agreement(self) -> StopAgreement | None:
        """How the prompt's group agrees on a step to stop at (parallel/stop.py): alone for a group
        of one rank, through the rendezvous store otherwise; None when there is no store."""
        if self.comm.size("agree") == 1:
            return StopAgreement()
        store = connect_store("skipsync/stop/", self.timeout_s)
        return None if store is None else StopAgreement(store)

    # ------------------------------------------------------------------ one generation
    def start(self, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cfg_scale: float) -> ShardedRun:
        """This rank's share of one generation from the full noise z (the same on every rank of the
        group) and the conditioning y = [cond; null] (2B, L, C)."""
        return ShardedRun(self, z, y, mask, cfg_scale)


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

    def report(self, memory: dict | None = None) -> dict:
        """For the run report: the mesh, the layout, and every rank's collectives per step (a
        collective over the group, after the loop; its own cost is not in the per-step lists).
        `memory`: this rank's peaks and phases (runner.report.Phases.memory()), gathered likewise."""
        log = self.comm.log
        summary = log.summary()
        mine = {"rank": self.mesh.rank, "dp_rank": self.mesh.dp_rank, "cfg_rank": self.mesh.cfg_rank,
                "sp_rank": self.mesh.sp_rank, "per_step": {str(k): v for k, v in log.per_step().items()},
                "outside_steps": {"by_phase": _phases_outside_steps(log), **summary["outside_steps"]}}
        if memory is not None:
            mine["memory"] = memory
        if self.layout is not None and self.layout.geometry is not None and self.layout.size > 1:
            g = self.layout.geometry
            start, total = g.rows
            mine["band"] = {"patch_rows": [start, start + g.row_sizes[g.rank]], "of_patch_rows": total,
                            "latent_rows": list(g.latent_range())}
        with log.in_phase("report"):
            ranks = self.comm.all_gather_object(mine, "agree", tag="report")
        mesh = {k: v for k, v in self.mesh.describe().items() if not k.endswith("rank")}
        return {"mesh": mesh, "layout": self.layout_name if self.mesh.sp > 1 else None,
                "collectives_per_rank": ranks}

    def close(self) -> None:
        # The watchdog first: finish() joins its thread, which must not still be inside a store call
        # while the process group and then the interpreter are torn down (SIGABRT at exit, issue 13).
        if self.watchdog is not None:
            self.watchdog.finish()
            self.watchdog = None
        if self.layout is not None:
            self.layout.remove()
            self.layout = None
        self.mesh.destroy()


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
    s = cfg.parallel
    if s.layout not in LAYOUTS:
        raise UserError(f"parallel.layout={s.layout!r} is not known; use one of: {', '.join(LAYOUTS)}.")
    if not s.timeout_s > 0:
        raise UserError(f"parallel.timeout_s must be > 0 seconds (got {s.timeout_s}).")
    backend = s.backend
    if backend == "auto" and cfg.device == "cpu":
        backend = "gloo"  # CPU tensors on a CUDA machine
    try:
        mesh = init_mesh(dataclasses.replace(s, backend=backend))
    except ValueError as e:
        raise UserError(f"parallel: {e}.") from None
    watchdog = None
    if mesh.is_distributed:
        watchdog = Watchdog.connect(mesh.rank, mesh.world_size, s.timeout_s)
        if watchdog is not None:
            watchdog.start()
    return Parallel(mesh, Comm(mesh), s.layout, watchdog, s.timeout_s)
