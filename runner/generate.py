"""Generate videos from prompts: the main SkipSync job (a Hydra app over conf/config.yaml).

    python -m runner.generate prompt="a red circle moves left on a dark background"
    python -m runner.generate prompts_file=prompts.txt seed=1 sampler.num_steps=30 output_dir=out
    python -m runner.generate --prompt "any text, even (this)! or ${this}"   # taken verbatim
    skipsync prompt="..."                      # the same, as a console script

Each video is written as <output_dir>/<index>-<slug>-s<seed>-<key>.mp4 (key: a hash of the prompt,
the seed and the settings, runner/outputs.py) with a JSON run report next to it that names it.
"""

from __future__ import annotations

import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from runner import cli, distributed, estimate, faults, report as run_report, requeue
from runner import conditioning as conditioning_
from runner.assemble import Job, assemble
from runner.checkpoint import Checkpoints
from runner.config import (
    CONF_DIR, Config, UserError, check_seeds, read_prompts, register_configs, resolve_device, resolve_dtype,
    resolve_presets, validate,
)
from runner.distributed import Parallel
from runner.outputs import OutputDir, check_writable, is_complete, video_key, video_name
from runner.sampler import GivenFrames, check_finite, make_timesteps, sample
from runner.video import to_uint8, write_video

register_configs()


def check_output_dir(path: str) -> None:
    """Refuse an output_dir that cannot be written, without creating it (a failed run leaves nothing)."""
    check_writable(path)


def prompt_seed(base_seed: int, index: int) -> int:
    """The noise seed of prompt `index`: independent of how many GPUs or groups run the job."""
    return base_seed + index


def noise(shape: tuple[int, ...], seed: int, device: torch.device, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `seed`, so it is the same on every device and rank.
    `generator`: continue that CPU generator's stream instead (a conditioned prompt draws its
    initial noise, every step's noise and each loop's noise from one stream, as Open-Sora does)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


# Video frames -> latent frames per family (the units of a mask strategy), known before the model loads.
FRAME_MAPS = {"demo": conditioning_.DEMO_FRAMES, "opensora-v1.2": conditioning_.OPENSORA_FRAMES}


def prepare_conditioning(cfg: Config, prompts: list[str]) -> list[conditioning_.PromptConditioning]:
    """Every prompt's references loaded and its strategy checked: a bad one stops the job here,
    before anything loads or any file is written."""
    return [conditioning_.prepare(p, cfg.reference, cfg.mask_strategy, cfg.condition, cfg.condition_frame_length,
                                  cfg.loop, cfg.num_frames, cfg.height, cfg.width, FRAME_MAPS[cfg.model.family],
                                  cfg.condition_frame_edit)
            for p in prompts]


@torch.no_grad()
def generate_one(job: Job, cfg: Config, prompt: str, seed: int, progress: bool = False, cond=None, phases=None,
                 ckpt=None, given=None):
    """-> (video (3, T, H, W) in [-1, 1], final latent, per-step seconds of the steps run).

    `job`: the assembled job (runner/assemble.py): pipeline, parallel job, layout, cache policy.
    `cond`: the prompt's conditioning when the caller encoded a batch of prompts (else it is
    encoded here); `phases` (runner.report.Phases), if given, closes "sampling" and "decoding".
    `ckpt`: the video's step checkpoints (runner.checkpoint.VideoCheckpoints), or None: the loop
    resumes from the newest usable one, writes them, and on a stop signal ends at one (Stopped).
    `given`: (reference latents, mask entries, loop index, CPU generator) for a conditioned
    prompt: the given frames are placed in the noise and kept through the loop (runner.sampler.
    GivenFrames), the noise of every step drawn in full from the generator and cut to this rank's
    band. The group's ranks decode a share of the chunks each; every rank of the group gets the video
    (a loop re-encodes it), only the writer writes it.
    """
    pipe, par = job.pipe, job.par
    settings = cfg.sampler
    # The size the model is conditioned on (bf16-rounded for Open-Sora: 854 -> 856), for both the
    # position-embedding scale and the timestep transform.
    height, width = pipe.conditioning_size(cfg.height, cfg.width)
    timesteps = make_timesteps(settings, height, width, cfg.num_frames)
    cond = (pipe.encode_text([prompt]) if cond is None else cond).to(pipe.device)
    shape = (1, *pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width))
    frames = None
    if given is None:
        z = noise(shape, seed, pipe.device)
    else:
        latents, entries, loop, gen = given
        z = noise(shape, seed, pipe.device, gen)
        ratios = conditioning_.place(z, latents, entries, loop).cpu()  # host masks: no device sync per step
        schedule = conditioning_.edit_schedule(ratios, timesteps, settings.num_timesteps)
    resume = ckpt.resume() if ckpt is not None else None  # the same step on every rank of the group
    run = par.start(z if resume is None else resume.latent, cond.y, cond.mask, settings.cfg_scale)  # band, CFG half
    if given is not None:
        # Drawn in full on every rank (the same numbers whatever sp or cfg), cut to this rank's band.
        frames = GivenFrames(schedule, lambda i: run.band(noise(shape, seed, pipe.device, gen)))
    start = 0
    if resume is not None:
        job.policy.load_state(resume.policy)
        torch.set_rng_state(resume.rng)
        start = resume.step
    if ckpt is not None:
        ckpt.begin()

    def model_fn(z_in, t_in, step, **extra):  # extra: the step's x_mask with given frames
        return job.denoise(z_in, t_in, run.y, run.mask, step, fps=cfg.fps, height=height, width=width, rows=run.rows,
                           **extra)

    step_times: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(timesteps), initial=start, desc="sampling", unit="step", file=sys.stderr, leave=False)
    clock = {}

    sync = pipe.device.type == "cuda"  # step times are device times: wait for the queued kernels

    def on_step(i: int, phase: str):
        run.on_step(i, phase)
        if sync:
            torch.cuda.synchronize(pipe.device)
        if phase == "start":
            clock["t0"] = time.perf_counter()
        else:
            step_times.append(time.perf_counter() - clock["t0"])
            if bar is not None:
                bar.update(1)

    try:
        # While the loop can stop at a checkpoint, a stop signal only asks it to (runner/cli.py).
        with cli.deferred_stops(ckpt is not None and ckpt.stops):
            z = sample(model_fn, run.z, settings, timesteps, pipe.latent_channels, on_step=on_step,
                       cfg_combine=run.cfg_combine, start=start,
                       before_step=None if ckpt is None else ckpt.before_step, given=frames)
        z = run.assemble(z)
        check_finite(z)
    except FloatingPointError as e:  # checked after the first step and at the end
        raise UserError(f"{e} (model.dtype={cfg.model.dtype}: float16 can overflow, use bfloat16 or float32; "
                        "otherwise check the weights and sampler.cfg_scale).") from None
    finally:
        if bar is not None:
            bar.close()
    if phases is not None:
        phases.end("sampling")
    video = par.decode(pipe, z, cfg.num_frames)[0]  # shared by the prompt's group
    if phases is not None:
        phases.end("decoding")
    return video, z, step_times


def sample_prompt(job: Job, cfg: Config, prompt: str, seed: int, plan: conditioning_.PromptConditioning, cond_of,
                  progress: bool = False, phases=None, ckpt=None):
    """One prompt's video: its loops (one for a plain prompt) generated and stitched.

    `plan`: the prompt's checked conditioning (runner.conditioning.prepare); `cond_of(loop)`: the
    encoded caption of a loop. -> (video (3, T, H, W), the last loop's latent, per-step seconds of
    every loop, the reports of the loops before the last)."""
    pipe = job.pipe
    given = None
    if plan.conditioned:
        # Seeded alike on every rank: the references' latents (a sampled VAE posterior) agree.
        enc_gen = torch.Generator(pipe.device).manual_seed(seed)
        latents = [pipe.encode_video(v[None].to(pipe.device), enc_gen)[0] for v in plan.videos]
        noise_gen = torch.Generator().manual_seed(seed)  # one stream for every loop of the prompt
    videos, step_times, loop_reports = [], [], []
    for loop in range(plan.plan.loops):
        if plan.conditioned:
            given = (latents, plan.entries, loop, noise_gen)
        video, latent, times = generate_one(job, cfg, prompt, seed, progress=progress, cond=cond_of(loop),
                                            phases=phases, ckpt=ckpt, given=given)
        videos.append(video)
        step_times += times
        if loop + 1 < plan.plan.loops:  # the next loop continues this one's video, encoded again
            latents.append(pipe.encode_video(video[None], enc_gen)[0])
            # each loop is a new generation: the policy starts over at its step 0
            loop_reports.append({"cache": job.policy.report(), "parallel": job.par.report()})
    video = conditioning_.stitch(videos, plan.plan.condition_frame_length, FRAME_MAPS[cfg.model.family])
    return video, latent, step_times, loop_reports


def generate(cfg: Config, par: Parallel | None = None) -> list[dict]:
    """Run the whole job; returns the run reports. Raises UserError / CheckpointError on bad input.
    `par`: the job's parallel setup when the caller made it (the CLI, for its fault handling);
    else it is made here from cfg.parallel. Whatever ends the job early, no partial file stays
    behind, and an output directory it created and left empty is removed again."""
    out = OutputDir(cfg.output_dir)
    try:
        return _generate(cfg, out, par)
    except BaseException:
        out.discard_if_empty()
        raise


def _generate(cfg: Config, out: OutputDir, par: Parallel | None) -> list[dict]:
    t_start = time.perf_counter()
    cfg = resolve_presets(cfg)
    par = par or distributed.setup(cfg)  # the mesh (torchrun env, cfg.parallel); no collective yet
    validate(cfg)
    prompts = read_prompts(cfg)
    check_seeds(cfg.seed, len(prompts))
    check_output_dir(cfg.output_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    if cfg.check_memory:  # from the shapes, before anything loads (runner/estimate.py)
        for warning in estimate.check(cfg, device, sp=par.mesh.sp, cfg_parallel=par.mesh.cfg):
            if par.rank == 0:
                print(f"warning: {warning}", file=sys.stderr)
    conds_in = prepare_conditioning(cfg, prompts)  # references read and checked before any work
    keys = [c.key() for c in conds_in]
    torch.manual_seed(cfg.seed)
    phases = run_report.Phases(device)
    job = assemble(cfg, device, dtype, par)  # build, load, layout, cache policy, compile
    pipe = job.pipe
    if pipe.random_weights and par.rank == 0:
        print("note: the model has random weights (model.weights is null); the videos are not meaningful.", file=sys.stderr)
    phases.end("loading")
    # step checkpoints, if the cache policy supports them (not with reference frames)
    checkpoints = Checkpoints.setup(cfg, job, conditioned=any(c.conditioned for c in conds_in))
    seeds = [prompt_seed(cfg.seed, i) for i in range(len(prompts))]
    names = [video_name(i, p, seeds[i], cfg, keys[i]) for i, p in enumerate(prompts)]
    par.skip_complete(len(prompts), lambda i: is_complete(out.stem(names[i]), prompts[i], seeds[i], cfg, keys[i]),
                      lambda i: names[i])
    t_ready = time.perf_counter()
    # All captions (every loop's) in one call: Open-Sora's T5 runs once and is freed before sampling.
    # The conditioning waits on the host so a long prompts file does not hold device memory.
    captions = [text for c in conds_in for text in c.captions]
    conds = pipe.encode_text(captions).to("cpu")
    first_caption = [sum(len(c.captions) for c in conds_in[:i]) for i in range(len(prompts))]
    phases.end("text_encoding")
    reports = []
    for index, prompt in enumerate(prompts):
        if not par.owns(index):  # another dp group's prompt, or complete already (resume)
            continue
        seed, name, plan = seeds[index], names[index], conds_in[index]
        notes = pipe.prompt_warnings(plan.captions[0])  # what the text encoder drops or cannot read
        if par.is_writer:
            for note in notes:
                print(f"warning: prompt {index}: {note}", file=sys.stderr)
        t0 = time.perf_counter()
        latent_shape = (1, *pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width))
        ckpt = checkpoints.video(out.stem(name), prompt, seed, video_key(prompt, seed, cfg, keys[index]), index,
                                 cfg.sampler.num_steps, latent_shape)
        video, latent, step_times, loop_reports = sample_prompt(
            job, cfg, prompt, seed, plan, lambda loop: conds.select(first_caption[index] + loop),
            progress=cfg.progress and par.is_writer, phases=phases, ckpt=ckpt)
        t_sampled = time.perf_counter()
        # a collective of the group, before the leader-only part; every rank's peaks and CPU time
        parallel_info = par.report(memory=phases.memory())
        if not par.is_writer:
            continue
        frames = to_uint8(video)
        rep = run_report.build(
            cfg, pipe, device, dtype, prompt=prompt, seed=seed, output=out.stem(name) + ".mp4", frames=frames,
            index=index, mesh=par.mesh, step_times=step_times, timings={
                "setup_s": t_ready - t_start,
                # text encoding is shared by all prompts of the job
                **{f"{k}_s": phases.records[k]["seconds"] for k in ("text_encoding", "sampling", "decoding")},
                "total_s": time.perf_counter() - t0,
            }, memory=phases.memory(),
        )
        rep["prompt_warnings"] = notes
        rep["parallel"] = parallel_info
        rep["cache"] = job.policy.report()
        start = (ckpt.resumed or 0) if ckpt is not None else 0  # a resumed run times only the steps it ran
        pattern = "".join(r["cache"].get("pattern") or "" for r in loop_reports) + (rep["cache"].get("pattern") or "")
        rep["steps"] = run_report.step_summary(step_times, pattern[start:] or None)
        if keys[index] is not None:
            rep["conditioning"] = keys[index]
            rep["conditioning_detail"] = {
                "reference_paths": plan.paths, "captions": plan.captions,
                "loops": plan.plan.loops, "stitched_frames": int(frames.shape[0]),
                # the earlier loops' cache and collectives (the last loop's are "cache" and "parallel")
                "earlier_loops": loop_reports}
        rep["checkpoint"] = ckpt.report() if ckpt is not None else {
            "every_steps": cfg.checkpoint.every_steps, "supported": False}
        rep["latent_shape"] = list(pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width))
        rep["timings"]["writing_s"] = 0.0

        def timed(write):  # the files' write time goes into the report, which is written after them
            def run(tmp):
                t = time.perf_counter()
                write(tmp)
                rep["timings"]["writing_s"] = round(rep["timings"]["writing_s"] + time.perf_counter() - t, 6)
            return run

        path = out.write_pair(
            name, timed(lambda tmp: write_video(tmp, frames, fps=cfg.fps)), rep,
            latent_writer=timed(lambda tmp: torch.save(latent.cpu(), tmp)) if cfg.save_latent else None)
        if ckpt is not None:
            ckpt.finished()  # the video is written: its step checkpoints go
        print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
              f"{rep['timings']['total_s']:.2f} s; written in {time.perf_counter() - t_sampled:.2f} s)",
              file=sys.stderr)
        reports.append(rep)
    par.close()
    return reports


def to_config(cfg: DictConfig) -> Config:
    return OmegaConf.to_object(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    par = None
    if requeue.under_submitit():  # a Hydra Slurm sweep's job: submitit's handlers would not checkpoint
        cli.stop_on_signals(requeue.stop_signals())
    try:
        cfg = to_config(dcfg)
        par = distributed.setup(cfg)
        generate(cfg, par)
    except BaseException as e:  # noqa: BLE001 - distributed: every rank must end, the error printed once
        faults.exit_on_error(e, par)  # one process: bad input and signals exit cleanly, the rest re-raised


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = cli.hydra_overrides(argv)
    except UserError as e:
        faults.exit_on_error(e)
        return
    cli.stop_on_signals()
    sys.argv = [sys.argv[0], *overrides]
    try:
        _hydra_main()
    except cli.Interrupted as e:  # a signal while Hydra composed the config, before generate
        faults.exit_on_error(e)


if __name__ == "__main__":
    main()
