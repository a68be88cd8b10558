"""The Open-Sora 1.2 family: T5-XXL -> STDiT3-XL/2 -> Open-Sora VAE 1.2, from local files only.

`model=opensora-v1.2 model.weights_dir=DIR` reads the three published parts in their Hugging Face
layouts (nothing is downloaded):

    DIR/stdit3   hpcai-tech/OpenSora-STDiT-v3   config.json, model.safetensors
    DIR/vae      hpcai-tech/OpenSora-VAE-v1.2   config.json, model.safetensors
    DIR/t5       DeepFloyd/t5-v1_1-xxl          config.json, weights, spiece.model or tokenizer.json

Memory plan: T5-XXL (19 GB in fp32, as published) runs once per batch of prompts and is freed
before sampling, so it is never resident next to the sampling activations (Open-Sora keeps it on
every GPU for the whole run). The DiT and the VAE stay resident; the VAE decodes in independent
chunks of 5 latent frames, which `chunks` / `decode_chunks` expose so that a caller can decode a
subset of them (a distributed decode gives different chunks to different ranks).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from models import t5 as t5_module
from models import vae as vae_module
from models.caption import prepare_prompt, prepare_prompts
from models.loading import CheckpointError, load_stdit3
from models.stdit3 import STDiT3
from models.vae import OpenSoraVAE, VAEChunk
from runner.config import DTYPES, ModelConfig, UserError
from runner.families.base import Conditioning, PipelineBase, quoted, trimmed_conditioning
from runner.presets import bf16_round

STDIT3_REPO = "hpcai-tech/OpenSora-STDiT-v3"
# T5 prompts per forward: bounds T5's activations when a prompts file is long.
TEXT_BATCH = 16


def _stdit3_missing(path: str) -> list[str]:
    return [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, f))]


# sub-directory of weights_dir -> (Hugging Face repo, what the directory lacks)
PARTS = {
    "stdit3": (STDIT3_REPO, _stdit3_missing),
    "vae": (vae_module.HF_REPO, vae_module.missing_files),
    "t5": (t5_module.HF_REPO, t5_module.missing_files),
}


def check_weights_dir(root: str) -> None:
    """Fail before loading anything if a part is missing, naming every missing file and the
    commands that fetch them."""
    problems, commands = [], []
    for part, (repo, missing_files) in PARTS.items():
        path = os.path.join(root, part)
        missing = missing_files(path)
        if missing:
            problems.append(f"  {path} ({repo}) lacks {', '.join(missing)}")
            commands.append(f"  huggingface-cli download {repo} --local-dir {path}")
    if problems:
        raise CheckpointError(
            f"model.weights_dir={root} is incomplete:\n" + "\n".join(problems)
            + "\nDownload the missing parts on a machine with network access, then copy them here:\n"
            + "\n".join(commands)
        )


class OpenSoraPipeline(PipelineBase):
    """Same interface as runner.families.demo.DemoPipeline."""

    family = "opensora-v1.2"
    random_weights = False

    def __init__(self, dit: STDiT3, vae: OpenSoraVAE, weights_dir: str, text_dtype: torch.dtype,
                 aes: float | None = 6.5, flow: float | None = None):
        self.dit, self.vae = dit, vae
        self.weights_dir, self.text_dtype = os.path.abspath(weights_dir), text_dtype
        self.aes, self.flow = aes, flow
        self.text_encoder: t5_module.T5TextEncoder | None = None
        self.text_parameters = 0
        self._t5_tokenizer = None  # for prompt_warnings once T5 is released: the tokenizer alone

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, *self.vae.latent_size(num_frames, height, width))

    def conditioning_size(self, height: int, width: int) -> tuple[float, float]:
        """Open-Sora builds the size conditioning as bf16 tensors: 854 becomes 856 in the
        position-embedding scale and the timestep transform. The published model was run that way,
        so the rounding is kept whatever dtype the DiT runs in."""
        return bf16_round(height), bf16_round(width)

    # ---- text --------------------------------------------------------------------------------
    def load_text_encoder(self) -> t5_module.T5TextEncoder:
        if self.text_encoder is None:
            self.text_encoder = t5_module.T5TextEncoder.from_pretrained(
                os.path.join(self.weights_dir, "t5"), dtype=self.text_dtype, device=self.device,
                max_length=self.dit.config.model_max_length,  # the null caption's length: 300
            )
            self.text_parameters = sum(p.numel() for p in self.text_encoder.model.parameters())
        return self.text_encoder

    def release_text_encoder(self) -> None:
        if self.text_encoder is not None:
            self.text_encoder.release()
            self.text_encoder = None

    def prompt_warnings(self, prompt: str) -> list[str]:
        """One-line warnings about what T5 silently loses of `prompt` as it is encoded (score suffix
        appended, cleaned): tokens past its 300, characters it reads as <unk>. Tokenizer only."""
        if self.text_encoder is not None:
            tok = self.text_encoder.tokenizer
        else:
            if self._t5_tokenizer is None:
                self._t5_tokenizer = t5_module.load_tokenizer(os.path.join(self.weights_dir, "t5"))
            tok = self._t5_tokenizer
        limit = self.dit.config.model_max_length  # T5's max_length (see load_text_encoder)
        text = prepare_prompt(prompt, aes=self.aes, flow=self.flow)
        content = tok(text, add_special_tokens=False, return_offsets_mapping=tok.is_fast, verbose=False)
        ids = content["input_ids"]
        total = len(tok(text, verbose=False)["input_ids"])  # with the </s> that truncation keeps
        keep = limit - (total - len(ids))
        out = []
        if total > limit:
            head = tok.decode(ids[keep:keep + 8]).strip() + (" ..." if len(ids) > keep + 8 else "")
            # The score suffix is appended last, so it is the first thing truncation cuts.
            scored = self.aes is not None or self.flow is not None
            out.append(f"T5 keeps {limit} tokens and the prompt{' with its score suffix' if scored else ''} has "
                       f"{total}: the last {total - limit} are dropped, from {head!r} on"
                       f"{' (the suffix with them)' if scored else ''}")
        unk = [i for i, t in enumerate(ids) if t == tok.unk_token_id]
        if unk:
            if tok.is_fast:
                what = quoted(list(dict.fromkeys(text[a:b].strip() for a, b in
                                                 (content["offset_mapping"][i] for i in unk))))
            else:
                what = f"{len(unk)} token(s)"
            out.append(f"characters T5 does not know (read as <unk>): {what}")
        return out

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """Prompt processing (score suffixes, clean_caption twice), T5 over all prompts, then T5 is
        freed: encode all prompts of a job in one call (a later call loads T5 again)."""
        texts = prepare_prompts(prompts, aes=self.aes, flow=self.flow)
        enc = self.load_text_encoder()
        # Trim every micro-batch to the longest prompt right away, so 300-token outputs of a long
        # prompts file are never held at once.
        n = int(enc.tokenize(texts)["attention_mask"].sum(1).max())
        ys, masks = [], []
        for i in range(0, len(texts), TEXT_BATCH):
            y, mask = enc.encode(texts[i:i + TEXT_BATCH])
            ys.append(y[:, :n].contiguous())
            masks.append(mask[:, :n])
        self.release_text_encoder()
        return trimmed_conditioning(torch.cat(ys), torch.cat(masks), self.dit.null_caption)

    # ---- decode ------------------------------------------------------------------------------
    def frames_for_latents(self, latent_frames: int) -> int:
        """The frame count a latent length decodes to when none is given: full chunks give
        micro_frame_size (17) frames, a last chunk of r latents 1 + time_factor*(r-1)."""
        full, rest = divmod(latent_frames, self.vae.latent_chunk_size)
        tf = self.vae.temporal_vae.time_factor
        return full * self.vae.micro_frame_size + (1 + tf * (rest - 1) if rest else 0)

    def chunks(self, num_frames: int) -> list[VAEChunk]:
        """The independent decode units of a num_frames video, in order."""
        return self.vae.chunks(num_frames)

    @torch.no_grad()
    def decode_chunks(self, z: torch.Tensor, num_frames: int, chunk_ids) -> torch.Tensor:
        """Frames of the chunks `chunk_ids` only, from the full latent z: (B, 3, frames, H, W) fp32."""
        return self.vae.decode_chunks(z, num_frames, chunk_ids).float().clamp_(-1, 1)

    def frame_size(self, z: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the decoded frames of latent z."""
        return int(z.shape[-2]) * self.vae.spatial_factor, int(z.shape[-1]) * self.vae.spatial_factor

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Latent (B, 4, T', h, w) -> video (B, 3, num_frames, 8h, 8w) in [-1, 1]."""
        num_frames = num_frames or self.frames_for_latents(z.shape[2])
        return self.decode_chunks(z, num_frames, range(len(self.chunks(num_frames))))

    @torch.no_grad()
    def encode_video(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> latent, sampling both posteriors as Open-Sora's
        inference does for references (a generator seeded alike on every rank: the same latent)."""
        return self.vae.encode(x.to(self.device), sample=True, generator=generator).float()

    def describe(self) -> dict:
        return {
            "family": self.family,
            "weights": self.weights_dir,
            "stdit3": self.dit.config.to_dict(),
            "parameters": {
                "stdit3": sum(p.numel() for p in self.dit.parameters()),
                "vae": sum(p.numel() for p in self.vae.parameters()),
                "t5": self.text_parameters,
            },
            "dtype": {k: str(v).replace("torch.", "") for k, v in
                      (("stdit3", self.dit.dtype), ("vae", self.vae.dtype), ("t5", self.text_dtype))},
            "prompt_suffixes": {"aes": self.aes, "flow": self.flow},
        }


def _check_parts_fit(pipe: OpenSoraPipeline) -> None:
    c, enc = pipe.dit.config, pipe.text_encoder
    problems = []
    if enc.output_dim != c.caption_channels:
        problems.append(f"T5 d_model {enc.output_dim} != STDiT3 caption_channels {c.caption_channels}")
    if pipe.vae.out_channels != c.in_channels:
        problems.append(f"VAE latent channels {pipe.vae.out_channels} != STDiT3 in_channels {c.in_channels}")
    if problems:
        raise CheckpointError(f"the parts in {pipe.weights_dir} do not fit together: " + "; ".join(problems) + ".")


def build_opensora_pipeline(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> OpenSoraPipeline:
    """Check the directory and the extra's packages first, then load STDiT3, the VAE and T5."""
    missing = [m for m in ("transformers", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"model=opensora-v1.2 needs {' and '.join(missing)}: pip install 'skipsync[opensora]'.")
    if cfg.weights_dir is None:
        raise UserError("model=opensora-v1.2 needs model.weights_dir=DIR (see conf/model/opensora-v1.2.yaml).")
    check_weights_dir(cfg.weights_dir)
    dit = load_stdit3(os.path.join(cfg.weights_dir, "stdit3"), dtype, device)
    # Open-Sora runs the VAE in the DiT's dtype.
    vae = OpenSoraVAE.from_pretrained(os.path.join(cfg.weights_dir, "vae"), device=device, dtype=dtype)
    pipe = OpenSoraPipeline(dit, vae, cfg.weights_dir, DTYPES[cfg.text_dtype], cfg.aes, cfg.flow)
    pipe.load_text_encoder()  # load errors surface now, not after the DiT has been set up
    _check_parts_fit(pipe)
    return pipe
