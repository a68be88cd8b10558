"""Open-Sora 1.2 video VAE (``OpenSoraVAE_V1_2``): 2D SDXL VAE per frame + causal temporal VAE.

Compression is 4 (time) x 8 x 8 (space) with 4 latent channels.

encode, x (B, 3, T, H, W) in [-1, 1]:
  1. spatial: every frame through ``AutoencoderKL`` (micro-batches of ``micro_batch_size``
     frames), latent * 0.18215 (hard-coded in Open-Sora, not the SDXL config's 0.13025);
  2. temporal: chunks of ``micro_frame_size`` = 17 frames, each front-padded with zeros to a
     multiple of 4 (17 -> 20) and encoded to 5 latent frames;
  3. normalise per channel: (z - shift) / scale.
decode, z (B, 4, T', h, w):
  1. un-normalise: z * scale + shift;
  2. temporal: independent chunks of 5 latent frames -> 20 frames, the first 3 dropped -> 17
     (a shorter last chunk keeps ``front_padding(n)`` fewer frames, as in Open-Sora);
  3. spatial: every frame through the 2D decoder (z / 0.18215).

Chunks do not see each other and the spatial decode is per frame, so ``decode_chunks`` can
decode any subset of chunks (a distributed decode gives different chunks to different ranks).

Open-Sora samples both posteriors when encoding; :meth:`OpenSoraVAE.encode` returns the mean
unless ``sample=True`` (text-to-video never encodes).

State-dict layout = the published ``hpcai-tech/OpenSora-VAE-v1.2`` file (a transformers
``VideoAutoencoderPipeline``): ``scale`` and ``shift`` buffers of shape (1, 4, 1, 1, 1),
``spatial_vae.module.*`` (diffusers ``AutoencoderKL`` keys) and ``temporal_vae.*``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.loading import CheckpointError, assign_state_dict, check_materialized, read_safetensors
from models.vae_temporal import TemporalVAE, TemporalVAEConfig

HF_REPO = "hpcai-tech/OpenSora-VAE-v1.2"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, subfolder vae (the SDXL VAE).
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SPATIAL_LATENT_SCALE = 0.18215  # hard-coded in Open-Sora's VideoAutoencoderKL
LATENT_SHIFT = (-0.10, 0.34, 0.27, 0.98)
LATENT_SCALE = (3.85, 2.32, 2.33, 3.06)
MICRO_FRAME_SIZE = 17
MICRO_BATCH_SIZE = 4


def chunk_frame_counts(num_frames: int, micro_frame_size: int = MICRO_FRAME_SIZE) -> list[int]:
    """Frames per independent chunk: 51 -> [17, 17, 17]; 40 -> [17, 17, 6]."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    full, rest = divmod(num_frames, micro_frame_size)
    return [micro_frame_size] * full + ([rest] if rest else [])


def latent_frames(num_frames: int, micro_frame_size: int = MICRO_FRAME_SIZE, time_factor: int = 4) -> int:
    """Latent length of a video: each chunk of n frames gives ceil(n / time_factor)."""
    return sum(-(-n // time_factor) for n in chunk_frame_counts(num_frames, micro_frame_size))


def latent_size(
    num_frames: int,
    height: int,
    width: int,
    *,
    micro_frame_size: int = MICRO_FRAME_SIZE,
    time_factor: int = 4,
    spatial_factor: int = 8,
) -> tuple[int, int, int]:
    """(T', h, w) of the published VAE: 51x720x1280 -> (15, 90, 160); 854 wide -> 106."""
    return (
        latent_frames(num_frames, micro_frame_size, time_factor),
        height // spatial_factor,
        width // spatial_factor,
    )


@dataclass(frozen=True)
class VAEChunk:
    """One independent decode unit: latent frames [latent_start, latent_stop) decode to
    video frames [frame_start, frame_stop)."""

    index: int
    latent_start: int
    latent_stop: int
    frame_start: int
    frame_stop: int

    @property
    def num_frames(self) -> int:
        return self.frame_stop - self.frame_start


class SpatialVAE(nn.Module):
    """Per-frame 2D VAE. ``.module`` is the diffusers ``AutoencoderKL`` (checkpoint path
    ``spatial_vae.module.*``)."""

    def __init__(self, config: dict | None = None, micro_batch_size: int | None = MICRO_BATCH_SIZE):
        super().__init__()
        from diffusers import AutoencoderKL  # optional dependency (extra "opensora")

        self.module = AutoencoderKL(**dict(config or SDXL_VAE_CONFIG))
        self.micro_batch_size = micro_batch_size
        self.factor = 2 ** (len(self.module.config.block_out_channels) - 1)

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        b = x.shape[0]
        flat = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B T) C H W, batch-major like Open-Sora
        step = self.micro_batch_size or flat.shape[0]
        out = torch.cat([fn(flat[i:i + step]) for i in range(0, flat.shape[0], step)], dim=0)
        return out.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        def one(frames):
            dist = self.module.encode(frames).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            return z * SPATIAL_LATENT_SCALE

        return self._frames(x, one)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._frames(z, lambda frames: self.module.decode(frames / SPATIAL_LATENT_SCALE).sample)


class OpenSoraVAE(nn.Module):
    def __init__(
        self,
        spatial_config: dict | None = None,
        temporal_config: TemporalVAEConfig | None = None,
        *,
        micro_batch_size: int | None = MICRO_BATCH_SIZE,
        micro_frame_size: int = MICRO_FRAME_SIZE,
        shift: tuple[float, ...] = LATENT_SHIFT,
        scale: tuple[float, ...] = LATENT_SCALE,
    ):
        super().__init__()
        self.spatial_vae = SpatialVAE(spatial_config, micro_batch_size)
        self.temporal_vae = TemporalVAE(temporal_config)
        self.micro_frame_size = micro_frame_size
        channels = self.temporal_vae.config.embed_dim
        if len(shift) != channels or len(scale) != channels:
            raise ValueError(f"shift and scale need {channels} values, got {len(shift)} and {len(scale)}")
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1, 1))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.temporal_vae.config.embed_dim

    @property
    def spatial_factor(self) -> int:
        return self.spatial_vae.factor

    @property
    def latent_chunk_size(self) -> int:
        return self.temporal_vae.latent_frames(self.micro_frame_size)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return latent_size(
            num_frames,
            height,
            width,
            micro_frame_size=self.micro_frame_size,
            time_factor=self.temporal_vae.time_factor,
            spatial_factor=self.spatial_factor,
        )

    def chunks(self, num_frames: int) -> list[VAEChunk]:
        """The independent decode chunks of a ``num_frames`` video, in order."""
        out, lat, frame = [], 0, 0
        for i, n in enumerate(chunk_frame_counts(num_frames, self.micro_frame_size)):
            n_lat = self.temporal_vae.latent_frames(n)
            out.append(VAEChunk(i, lat, lat + n_lat, frame, frame + n))
            lat, frame = lat + n_lat, frame + n
        return out

    # ---- encode / decode ------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """x: (B, 3, T, H, W) in [-1, 1] -> normalised z: (B, 4, T', H/8, W/8)."""
        x = x.to(self.dtype)
        x_z = self.spatial_vae.encode(x, sample=sample, generator=generator)
        parts = []
        for start in range(0, x_z.shape[2], self.micro_frame_size):
            post = self.temporal_vae.encode(x_z[:, :, start:start + self.micro_frame_size])
            parts.append(post.sample(generator) if sample else post.mode())
        z = torch.cat(parts, dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    @torch.no_grad()
    def decode_chunks(self, z: torch.Tensor, num_frames: int, chunk_ids) -> torch.Tensor:
        """Decode only the chunks ``chunk_ids`` (indices into :meth:`chunks`) of the full latent
        ``z`` (B, 4, T', h, w); returns their frames concatenated in the order given."""
        plan = self.chunks(num_frames)
        if z.shape[2] != plan[-1].latent_stop:
            raise ValueError(
                f"{num_frames} frames need {plan[-1].latent_stop} latent frames, got z with {z.shape[2]}"
            )
        chunk_ids = list(chunk_ids)
        bad = [i for i in chunk_ids if not 0 <= i < len(plan)]
        if bad:
            raise ValueError(f"chunk ids {bad} out of range: {num_frames} frames have {len(plan)} chunks")
        if not chunk_ids:
            h, w = z.shape[-2] * self.spatial_factor, z.shape[-1] * self.spatial_factor
            return z.new_zeros((z.shape[0], 3, 0, h, w))
        z = z.to(self.dtype)
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        x_z = torch.cat(
            [
                self.temporal_vae.decode(z[:, :, plan[i].latent_start:plan[i].latent_stop], plan[i].num_frames)
                for i in chunk_ids
            ],
            dim=2,
        )
        return self.spatial_vae.decode(x_z)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """z: (B, 4, T', h, w) -> video (B, 3, num_frames, 8h, 8w), roughly in [-1, 1]."""
        return self.decode_chunks(z, num_frames, range(len(self.chunks(num_frames))))

    # ---- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        micro_batch_size: int | None = None,
        spatial_config: dict | None = None,
        temporal_config: TemporalVAEConfig | None = None,
    ) -> "OpenSoraVAE":
        """Load strictly from a local directory laid out like ``hpcai-tech/OpenSora-VAE-v1.2``
        (``config.json`` + ``model.safetensors``). Nothing is downloaded.

        ``micro_frame_size`` and ``vae_2d.micro_batch_size`` come from config.json (17 and 4
        for the published file) unless ``micro_batch_size`` is given. ``spatial_config`` and
        ``temporal_config`` override the architecture, as does an ``arch`` entry in config.json
        (``{"spatial": AutoencoderKL kwargs, "temporal": TemporalVAEConfig kwargs}``, which tiny
        test checkpoints carry); the default is the published one. Errors: ``CheckpointError``.
        """
        path = os.fspath(path)
        missing = missing_files(path)
        if missing:
            raise CheckpointError(
                f"Open-Sora VAE directory {path!r} lacks {', '.join(missing)}; expected {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (the layout of {HF_REPO}). Download it with:\n"
                f"  huggingface-cli download {HF_REPO} --local-dir {path}"
            )
        try:
            with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}/{CONFIG_FILE}: {e}") from None
        model_type = config.get("model_type")
        if model_type not in (None, "VideoAutoencoderPipeline"):
            raise CheckpointError(
                f"{path}/{CONFIG_FILE} has model_type {model_type!r}; expected 'VideoAutoencoderPipeline' "
                f"({HF_REPO})"
            )
        # The published config.json names its 2D VAE instead of describing it; a non-published
        # checkpoint (tiny test models) carries its widths under "arch".
        arch = config.get("arch") or {}
        if spatial_config is None:
            spatial_config = arch.get("spatial")
        if temporal_config is None and arch.get("temporal"):
            temporal_config = TemporalVAEConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in arch["temporal"].items()}
            )
        if micro_batch_size is None:
            micro_batch_size = (config.get("vae_2d") or {}).get("micro_batch_size", MICRO_BATCH_SIZE)
        kwargs = dict(
            micro_batch_size=micro_batch_size,
            micro_frame_size=config.get("micro_frame_size") or MICRO_FRAME_SIZE,
            shift=tuple(config.get("shift", LATENT_SHIFT)),
            scale=tuple(config.get("scale", LATENT_SCALE)),
        )
        with torch.device("meta"):
            model = cls(spatial_config, temporal_config, **kwargs)
        file = os.path.join(path, WEIGHTS_FILE)
        what = f"Open-Sora VAE checkpoint {file!r}"
        assign_state_dict(model, read_safetensors(file, dtype, device), what)
        check_materialized(model, what)
        return model.eval().requires_grad_(False)


def missing_files(path: str) -> list[str]:
    """The files of the published layout that directory `path` lacks."""
    return [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not os.path.isfile(os.path.join(path, f))]
