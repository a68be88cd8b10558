"""Step checkpoints: a stopped or killed generation resumes at a step boundary, bit-exactly, on the
same or another number of ranks.

On disk, beside the video it becomes (the stem names the prompt, seed and settings):

    <output_dir>/<stem>.ckpt/step-<NNNN>/<cfg_rank>-<sp_rank>.pt

one file per rank of the prompt's group (cfg x sp), each written under a temporary name and renamed
into place. A file holds the latent before step NNNN (this rank's band of patch rows), the cache
policy's state at that boundary (`CachePolicy.state`), torch's CPU RNG state, and what identifies
it: format, step, num_steps, prompt, seed, settings key (runner.outputs.video_key), sp, cfg, layout,
the band's rows. A step is complete when all cfg x sp files exist and agree.

When. Only at a boundary before a step the policy computes (`CachePolicy.will_compute`): a reused
step stays free of any communication. With `checkpoint.every_steps=K`, at the first computed
boundary at least K steps after the last checkpoint (or the resumed step); the pattern of computed
steps is agreed, so every rank of the group picks the same boundaries. On a stop signal the ranks
agree on a computed boundary through the rendezvous store (parallel/stop.py), write the checkpoint
there and leave (`Stopped`: exit code 75, or 130 for Ctrl-C).

Which are kept: the two newest. After writing step s the group leader removes every other step
directory except the previous checkpoint's (or the resumed one). That is safe: checkpoints are taken
only before computed steps, and no rank finishes a computed step before every rank of the group
has entered it, so when any rank writes step s, every rank has finished writing the previous one
and no rank writes anything but step s. The leader removes the whole directory once the video is
written.

Resume. Before sampling a prompt every rank of the group reads the newest complete checkpoint whose
identity matches, assembles the full latent and the policy's band tensors from all shard files
(bands are row ranges: concatenated in order) and keeps its own band of the new layout; one small
all_gather_object over the group checks that every rank found the same step. A corrupt, incomplete
or mismatched step is refused with one line saying why and not used; the next older one is tried,
else the video starts from noise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass

import torch

from parallel.shard import RowShard, row_shard
from runner import cli
from runner.outputs import temp_path

FORMAT = 1
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure; the caller may retry (Slurm: requeue and resume)
_STEP_DIR = re.compile(r"step-(\d+)")
_SHARD = re.compile(r"(\d+)-(\d+)\.pt")


class Stopped(BaseException):
    """The group stopped at a step checkpoint on a signal (a BaseException, like Interrupted)."""

    def __init__(self, signum: int, step: int, num_steps: int, path: str):
        super().__init__(signum, step, path)
        self.signum, self.step, self.num_steps, self.path = signum, step, num_steps, path

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C, as a shell reports it; 75 (EX_TEMPFAIL: rerun to resume) otherwise."""
        return 128 + signal.SIGINT if self.signum == signal.SIGINT else EX_TEMPFAIL

    def message(self, distributed: bool) -> str:
        where = (f"every rank of the group stopped after {self.step} of {self.num_steps} steps" if distributed
                 else f"stopped after {self.step} of {self.num_steps} steps")
        # under a launcher this process's own command line is not the one to run again
        launched = distributed or any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"))
        how = ("run the same launch command again to resume" if launched
               else f"resume with the same command: {shlex.join(sys.orig_argv)}")
        return (f"{self.name} received; {where}, checkpoint in {self.path}; no partial video is left, "
                f"finished videos are kept; {how}")


class Refused(Exception):
    """A checkpoint step that cannot be used; the message says why."""


@dataclass
class Resume:
    """What a rank continues from: the step, the full latent, its policy state, the RNG state."""

    step: int
    path: str
    latent: torch.Tensor
    policy: dict
    rng: torch.Tensor


class Checkpoints:
    """The job's step checkpoints: its settings, the policy, the group's stop agreement."""

    def __init__(self, every_steps: int, par, policy, patch, device, agreement=None, enabled: bool = True):
        self.every, self.par, self.policy, self.patch, self.device = every_steps, par, policy, tuple(patch), device
        self.enabled = enabled  # False: the policy has no state support; nothing is written or read
        self.agreement = agreement  # parallel.stop.StopAgreement; None: a stop signal ends the run as before

    @classmethod
    def setup(cls, cfg, job, conditioned: bool = False) -> "Checkpoints":
        """From cfg.checkpoint and the assembled job; says once (on rank 0) what is not possible.
        `conditioned`: a prompt of the job has reference frames; those runs are not checkpointed
        (their resume would also need the references' latents, the edit ratios and the per-step
        noise stream), and the job says so once."""
        par, policy = job.par, job.policy
        say = (lambda text: print(f"warning: {text}", file=sys.stderr)) if par.rank == 0 else (lambda text: None)
        every = cfg.checkpoint.every_steps
        if conditioned:
            if every > 0:
                say(f"runs with reference frames (reference, mask_strategy, condition, loop) have no step checkpoints: "
                    f"checkpoint.every_steps={every} is ignored, and a stop signal ends the run without one")
            return cls(every, par, policy, job.dit.config.patch_size, job.pipe.device, enabled=False)
        if not policy.checkpointable:
            if every > 0:
                say(f"cache={policy.name} has no step checkpoints: checkpoint.every_steps={every} is ignored, and a "
                    "stop signal ends the run without one (finished videos are kept)")
            return cls(every, par, policy, job.dit.config.patch_size, job.pipe.device, enabled=False)
        agreement = par.stop_agreement()
        if agreement is None:
            say("no rendezvous store (MASTER_ADDR, MASTER_PORT) to agree on a stop step: a stop signal ends the run "
                "without a checkpoint")
        return cls(every, par, policy, job.dit.config.patch_size, job.pipe.device, agreement)

    def video(self, stem: str, prompt: str, seed: int, key: str, index: int, num_steps: int,
              latent_shape) -> "VideoCheckpoints | None":
        if not self.enabled:
            return None
        return VideoCheckpoints(self, stem, prompt, seed, key, index, num_steps, tuple(latent_shape))


class VideoCheckpoints:
    """The checkpoints of one video on this rank: resume, the sampler's boundary hook, cleanup."""

    def __init__(self, ck: Checkpoints, stem, prompt, seed, key, index, num_steps, latent_shape):
        self.ck, self.prompt, self.seed, self.key, self.index = ck, prompt, seed, key, index
        self.num_steps, self.latent_shape = num_steps, latent_shape  # latent_shape: (B, C, T, H, W)
        self.dir = stem + ".ckpt"
        m = ck.par.mesh
        self.sp, self.cfg, self.sp_rank, self.cfg_rank = m.sp, m.cfg, m.sp_rank, m.cfg_rank
        self.geometry: RowShard = row_shard(latent_shape, ck.patch, self.sp, self.sp_rank)
        self.last = 0  # the step of the last checkpoint or the resumed one (every_steps counts from it)
        self.keep: int | None = None  # the previous checkpoint's step, kept beside the newest
        self.written: list[int] = []
        self.resumed: int | None = None

    @property
    def stops(self) -> bool:
        """Whether a stop signal can end this video at a checkpoint (else it ends the run as before)."""
        return self.ck.agreement is not None

    def _say(self, text: str) -> None:
        if self.ck.par.is_writer:
            print(text, file=sys.stderr)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step:04d}")

    # ------------------------------------------------------------------ resume
    def resume(self) -> Resume | None:
        """The newest usable checkpoint for this rank, or None (from noise). Every rank of the group
        calls it: one all_gather_object makes sure they all continue from the same step."""
        found, refusals = self._find()
        for path, why in refusals:
            self._say(f"warning: checkpoint {path} not used: {why}")
        steps = self.ck.par.comm.all_gather_object(None if found is None else found.step, "agree",
                                                    tag="checkpoint")
        if any(s != steps[0] for s in steps):
            self._say(f"warning: the ranks found different checkpoints in {self.dir} (steps {steps}): is output_dir "
                      "on a file system that every rank shares? none used; generating from noise")
            found = None
        elif refusals and found is None:
            self._say(f"warning: no usable checkpoint in {self.dir}; generating from noise")
        if found is not None:
            self.resumed = self.last = self.keep = found.step
            self._say(f"resuming {os.path.basename(self.dir)[:-5]} after {found.step} of {self.num_steps} steps "
                      f"(checkpoint {found.path})")
        return found

    def _find(self) -> tuple[Resume | None, list[tuple[str, str]]]:
        refusals = []
        if not os.path.isdir(self.dir):
            return None, refusals
        steps = sorted(((int(m.group(1)), name) for name in os.listdir(self.dir)
                        if (m := _STEP_DIR.fullmatch(name))), reverse=True)
        for step, name in steps:
            path = os.path.join(self.dir, name)
            try:
                return self._read(step, path), refusals
            except Refused as e:
                refusals.append((path, str(e)))
        return None, refusals

    def _read(self, step: int, path: str) -> Resume:
        """The step's shard files, checked and assembled for this rank; Refused says what is wrong."""
        shards = {}
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise Refused(f"unreadable ({e.strerror})") from None
        for name in names:
            m = _SHARD.fullmatch(name)
            if m is None:
                continue
            try:
                p = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file: the step is not used
                first_line = (str(e).splitlines() or [""])[0][:120]
                raise Refused(f"{name} is unreadable ({type(e).__name__}: {first_line})") from None
            if not isinstance(p, dict) or p.get("format") != FORMAT:
                got = p.get("format") if isinstance(p, dict) else type(p).__name__
                raise Refused(f"{name} has format {got!r}; this version reads format {FORMAT}")
            shards[(int(m.group(1)), int(m.group(2)))] = p
        if not shards:
            raise Refused("it holds no shard files")
        self._check_identity(shards, step)
        first = shards[min(shards)]
        sp, cfg = first["sp"], first["cfg"]
        expected = {(c, s) for c in range(cfg) for s in range(sp)}
        if set(shards) - expected or any((p["sp"], p["cfg"]) != (sp, cfg) for p in shards.values()):
            raise Refused("its shard files come from runs with different parallel.sp or parallel.cfg")
        if set(shards) != expected:
            raise Refused(f"incomplete: {len(shards)} of the {len(expected)} shard files (sp={sp} x cfg={cfg}); "
                          "the run was killed while writing it")
        return self._assemble(shards, step, path, sp, cfg)

    def _check_identity(self, shards: dict, step: int) -> None:
        stale = "; the name is this video's, so the checkpoint is stale"
        for (c, s), p in sorted(shards.items()):
            name = f"{c}-{s}.pt"
            if p.get("prompt") != self.prompt:
                raise Refused(f"{name} is for another prompt ({str(p.get('prompt'))[:60]!r}){stale}")
            if p.get("seed") != self.seed:
                raise Refused(f"{name} is for seed {p.get('seed')}, not {self.seed}{stale}")
            if p.get("key") != self.key:
                raise Refused(f"{name} is for other settings (key {p.get('key')}, this run's is {self.key}){stale}")
            if p.get("num_steps") != self.num_steps or p.get("step") != step:
                raise Refused(f"{name} is for step {p.get('step')} of {p.get('num_steps')}, not step {step} of "
                              f"{self.num_steps}{stale}")
            if tuple(p.get("latent_shape", ())) != self.latent_shape:
                raise Refused(f"{name} holds a latent of shape {p.get('latent_shape')}, this video's is "
                              f"{list(self.latent_shape)}{stale}")
            if p.get("policy", {}).get("name") != self.ck.policy.name:
                raise Refused(f"{name} holds the state of cache policy {p.get('policy', {}).get('name')!r}, not "
                              f"{self.ck.policy.name!r}{stale}")

    def _assemble(self, shards: dict, step: int, path: str, sp: int, cfg: int) -> Resume:
        """This rank's share from the full latent and the policy's full band tensors."""
        cols = self.geometry.patch_cols
        try:
            latent = torch.cat([shards[(0, s)]["latent"] for s in range(sp)], dim=-2)
            lead = shards[(0, 0)]["policy"]
            bands, tensors = dict(lead["bands"]), dict(lead["tensors"])
            g = self.geometry
            r0 = g.rows[0]
            r1 = r0 + g.row_sizes[g.rank]
            for name, dim in bands.items():
                halves = []
                for c in range(cfg):
                    parts = [shards[(c, s)]["policy"]["tensors"][name] for s in range(sp)]
                    for s, t in enumerate(parts):
                        a, b = shards[(c, s)]["patch_rows"]
                        if t.shape[dim] != (b - a) * cols:
                            raise Refused(f"{c}-{s}.pt: the band {name!r} has {t.shape[dim]} tokens on dim {dim}, not "
                                          f"{(b - a) * cols} for patch rows {a}..{b}")
                    halves.append(torch.cat(parts, dim=dim))
                full = torch.cat(halves, dim=0)  # the model batch [cond; uncond] of the whole group
                mine = full.chunk(self.cfg, dim=0)[self.cfg_rank] if self.cfg > 1 else full
                tensors[name] = mine.narrow(dim, r0 * cols, (r1 - r0) * cols).clone()
        except Refused:
            raise
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise Refused(f"its shard files do not fit together ({type(e).__name__}: {e})") from None
        if tuple(latent.shape) != self.latent_shape:
            raise Refused(f"its bands make a latent of shape {list(latent.shape)}, not {list(self.latent_shape)}")
        state = {"meta": lead["meta"], "bands": bands,
                 "tensors": {k: v.to(self.ck.device) for k, v in tensors.items()}}
        return Resume(step, path, latent.to(self.ck.device), state, shards[(0, 0)]["rng"])

    # ------------------------------------------------------------------ the loop
    def begin(self) -> None:
        """Before sampling: the leader removes step directories that will not be used (stale or
        refused ones; safe: no rank of this group writes before the first computed step, which
        needs the leader); the stop agreement starts for this video."""
        if self.ck.par.is_writer and os.path.isdir(self.dir):
            self._prune(keep={self.resumed})
        if self.ck.agreement is not None:
            m = self.ck.par.mesh
            # unique within the store's life: torchrun restarts keep the store
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.ck.agreement.begin(f"{restart}/{m.dp_rank}/{self.index}-{self.key}")

    def before_step(self, i: int, z: torch.Tensor) -> None:
        """The sampler's hook at the boundary before step i, z being this rank's band of the latent."""
        if not self.ck.policy.will_compute(i):
            return  # a reused step: no store, no file, nothing but the step itself
        stop = False
        if self.ck.agreement is not None:
            stop = self.ck.agreement.at_boundary(cli.pending_stop())
        due = self.ck.every > 0 and i >= self.last + self.ck.every
        if (stop or due) and i != self.keep:  # (a stop at the resumed step: it is on disk already)
            self._write(i, z)
        if stop:
            cli.ignore_stops()  # the process ends on this one
            raise Stopped(self.ck.agreement.signum, i, self.num_steps, self.step_dir(i))

    def _write(self, step: int, z: torch.Tensor) -> None:
        st = self.ck.policy.state()
        g = self.geometry
        r0 = g.rows[0]
        payload = {
            "format": FORMAT, "step": step, "num_steps": self.num_steps, "prompt": self.prompt, "seed": self.seed,
            "key": self.key, "sp": self.sp, "cfg": self.cfg, "sp_rank": self.sp_rank, "cfg_rank": self.cfg_rank,
            "layout": self.ck.par.layout_name, "latent_shape": list(self.latent_shape),
            "patch_rows": [r0, r0 + g.row_sizes[g.rank]], "of_patch_rows": g.patch_rows,
            "latent_rows": list(g.latent_range()), "latent": _host(z),
            "policy": {"name": self.ck.policy.name, "meta": st["meta"], "bands": st["bands"],
                       "tensors": {k: _host(v) for k, v in st["tensors"].items()}},
            "rng": torch.get_rng_state(),
        }
        d = self.step_dir(step)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{self.cfg_rank}-{self.sp_rank}.pt")
        tmp = temp_path(path)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if self.ck.par.is_writer:  # see the module docstring for why this is safe
            self._prune(keep={step, self.keep})
        self.written.append(step)
        self.keep = self.last = step

    def _prune(self, keep: set) -> None:
        for name in os.listdir(self.dir):
            m = _STEP_DIR.fullmatch(name)
            if m and int(m.group(1)) not in keep:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def finished(self) -> None:
        """The video is written: its checkpoints are not needed any more (the leader removes them)."""
        if self.ck.par.is_writer:
            shutil.rmtree(self.dir, ignore_errors=True)

    def report(self) -> dict:
        a = self.ck.agreement
        return {"supported": True, "every_steps": self.ck.every, "resumed_from_step": self.resumed,
                "written_steps": list(self.written),
                "stop_store_checks": None if a is None or a.store is None else a.store_checks}


def _host(t: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy (torch.save of a view would write its whole storage)."""
    return t.detach().to("cpu", copy=True).contiguous()
