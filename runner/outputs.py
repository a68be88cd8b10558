"""Where a job's files go, under names that never collide, written so that nothing is lost or mixed up.

- A video's name holds its prompt's index, a slug of the prompt, its seed and a key: a hash of the
  full prompt, the seed and every setting that changes the pixels (`content_config`). Two videos
  share a name only if they are the same video.
- Every file is written under a temporary name unique to the process (pid + random token) and
  renamed into place; the report is renamed last and names its video and the video's SHA-256, so a
  pair on disk is complete only when the report says so (`is_complete`, used by resume).
- The pair is renamed under an exclusive lock on the output directory, so two runs that make the
  same video at once leave one run's video with that run's report.
- The output directory is created at the first write; a run that fails before it keeps nothing,
  and one that created the directory and wrote nothing into it removes it again (`discard_if_empty`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import tempfile

from runner.config import Config, UserError

# Config keys that do not change the video: a rerun with other values finds the same name. The
# prompt and the seed are hashed on their own (the per-prompt seed, not the base seed).
NOT_CONTENT = ("parallel", "progress", "output_dir", "prompt", "prompts_file", "save_latent", "device", "seed",
               "check_memory", "checkpoint")


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "video"


def plain_config(cfg: Config) -> dict:
    """The config as plain JSON values (not through OmegaConf: a prompt or path may contain '${',
    which it would resolve); what the run report records."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def content_config(cfg: Config | dict) -> dict:
    """The settings that decide the pixels: of a Config, or of a report's recorded config."""
    conf = plain_config(cfg) if dataclasses.is_dataclass(cfg) else cfg
    if not isinstance(conf, dict):
        return {}
    return {k: v for k, v in conf.items() if k not in NOT_CONTENT}


def video_key(prompt: str, seed: int, cfg: Config, conditioning: dict | None = None) -> str:
    """`conditioning`: what a conditioned prompt adds (runner.conditioning.PromptConditioning.key:
    the references' content hashes, the strategy, the loops); None leaves a plain prompt's key as it was."""
    content = {"prompt": prompt, "seed": seed, "config": content_config(cfg)}
    if conditioning is not None:
        content["conditioning"] = conditioning
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:10]


def video_name(index: int, prompt: str, seed: int, cfg: Config, conditioning: dict | None = None) -> str:
    """<index>-<slug>-s<seed>-<key>: unique for the prompt, its seed, the settings and the conditioning."""
    return f"{index:04d}-{slug(prompt)}-s{seed}-{video_key(prompt, seed, cfg, conditioning)}"


def temp_path(path: str) -> str:
    """A hidden sibling of path, unique to this process and call, with path's extension kept
    (ffmpeg picks the container from it)."""
    d, name = os.path.split(path)
    ext = os.path.splitext(name)[1]
    return os.path.join(d, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.partial{ext}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str) -> None:
    """output_dir exists and is writable, or can be created: checked without creating anything."""
    probe = os.path.normpath(path)
    while not os.path.exists(probe):  # the nearest existing ancestor, named as the user wrote it
        parent = os.path.dirname(probe) or "."
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        why = "it is not a directory" if probe == os.path.normpath(path) else f"{probe!r} is not a directory"
    else:
        try:  # a real write (permissions, read-only mounts; root passes os.access everywhere)
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".skipsync-write-test-"):
                return
        except OSError as e:
            why = f"{probe!r}: {e.strerror}"
    raise UserError(f"cannot write to output_dir={path!r} ({why}); choose a writable directory, e.g. output_dir=outputs.")


@contextlib.contextmanager
def dir_lock(path: str):
    """An exclusive flock on the directory itself (no lock file is left behind). Where the file
    system refuses (some network mounts), the pair is renamed without it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


class OutputDir:
    """The job's output directory (one per process; only writers write)."""

    def __init__(self, path: str):
        self.path = path
        self.existed = os.path.isdir(path)
        self.written: list[str] = []

    def stem(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _ensure(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def write_pair(self, name: str, write_video, report: dict, latent_writer=None) -> str:
        """Write <name>.mp4 (write_video(tmp_path)), optionally <name>.latent.pt, then <name>.json
        (report, to which the video's file name and hash are added). Temporary files are removed on any failure
        or signal. -> the video's path."""
        self._ensure()
        video, rep_path = self.stem(name) + ".mp4", self.stem(name) + ".json"
        tmps = []
        try:
            tmp_video = temp_path(video)
            tmps.append(tmp_video)
            write_video(tmp_video)
            report["video"] = {"file": os.path.basename(video), "sha256": file_sha256(tmp_video)}
            moves = [(tmp_video, video)]
            if latent_writer is not None:
                tmp_latent = temp_path(self.stem(name) + ".latent.pt")
                tmps.append(tmp_latent)
                latent_writer(tmp_latent)
                moves.append((tmp_latent, self.stem(name) + ".latent.pt"))
            tmp_rep = temp_path(rep_path)
            tmps.append(tmp_rep)
            with open(tmp_rep, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            with dir_lock(self.path):
                for src, dst in [*moves, (tmp_rep, rep_path)]:  # the report last: it vouches for the rest
                    os.replace(src, dst)
            self.written.append(name)
            return video
        finally:
            for t in tmps:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(t)

    def discard_if_empty(self) -> None:
        """After a failure: remove the directory if this run created it and it holds nothing."""
        if self.existed or not os.path.isdir(self.path):
            return
        with contextlib.suppress(OSError):
            os.rmdir(self.path)  # only succeeds when empty


def is_complete(stem: str, prompt: str, seed: int, cfg: Config, conditioning: dict | None = None) -> bool:
    """<stem>.mp4 and <stem>.json exist, the report is for this prompt, seed and settings, and it
    names this video with the hash the file has now (a pair from two runs, or a video replaced
    after its report, is not complete)."""
    video, rep_path = stem + ".mp4", stem + ".json"
    if not (os.path.isfile(video) and os.path.isfile(rep_path)):
        return False
    if cfg.save_latent and not os.path.isfile(stem + ".latent.pt"):
        return False
    try:
        with open(rep_path, encoding="utf-8") as f:
            rep = json.load(f)
        if not isinstance(rep, dict) or not isinstance(rep.get("video"), dict):
            return False
        return (rep.get("prompt") == prompt and rep.get("seed") == seed
                and rep["video"].get("file") == os.path.basename(video)
                and content_config(rep.get("config")) == content_config(cfg)
                and rep.get("conditioning") == conditioning
                and rep["video"].get("sha256") == file_sha256(video))
    except (OSError, ValueError):
        return False
