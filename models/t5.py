"""T5 text encoder of Open-Sora 1.2 (``DeepFloyd/t5-v1_1-xxl`` encoder, 300 tokens).

Tokenisation: padding to ``max_length`` = 300, truncation on, EOS appended. The output is the
encoder's ``last_hidden_state`` (B, 300, d_model) and the attention mask (B, 300). Open-Sora
runs T5 in fp32 (the default here). Nothing is downloaded: ``from_pretrained`` reads a local
directory laid out like the Hugging Face repo (``config.json``, the weights, ``spiece.model`` or
``tokenizer.json``) and fails loudly (``CheckpointError``) if a file or a weight is missing,
instead of initialising it at random.

Prompt processing (score suffixes, ``clean_caption``) lives in ``models/caption.py``;
``encode`` takes the final strings.
"""

from __future__ import annotations

import gc
import glob
import os
from collections.abc import Sequence

import torch

from models.caption import prepare_prompts  # noqa: F401  (re-exported for callers)
from models.loading import CheckpointError

HF_REPO = "DeepFloyd/t5-v1_1-xxl"
MAX_LENGTH = 300
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")

# Published sizes of T5 v1.1 XXL (the encoder is what Open-Sora uses).
T5_XXL_CONFIG = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=True,
    tie_word_embeddings=False,
)


def missing_files(path: str) -> list[str]:
    """What directory `path` lacks of the published layout (config, weights, tokenizer)."""
    problems = []
    if not os.path.isfile(os.path.join(path, "config.json")):
        problems.append("config.json")
    if not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
        problems.append("weights (" + " or ".join(WEIGHT_PATTERNS) + ")")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        problems.append("tokenizer (" + " or ".join(TOKENIZER_FILES) + ")")
    return problems


def _check_dir(path: str) -> None:
    problems = missing_files(path)
    if problems:
        raise CheckpointError(
            f"T5 directory {path!r} lacks {', '.join(problems)}; expected the layout of {HF_REPO} "
            f"(config.json, weights, spiece.model + tokenizer_config.json). Download it with:\n"
            f"  huggingface-cli download {HF_REPO} --local-dir {path}"
        )


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ImportError, ValueError, OSError) as err:
        raise CheckpointError(
            f"could not load the tokenizer from {path!r} ({type(err).__name__}: {err}). A directory with "
            "only spiece.model needs `sentencepiece` and `protobuf` installed to build the fast tokenizer "
            "(pip install 'skipsync[opensora]')."
        ) from err


class T5TextEncoder:
    """Tokeniser + ``T5EncoderModel``; ``encode(texts) -> (embeddings, mask)``."""

    def __init__(self, model, tokenizer, max_length: int = MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_dim = model.config.d_model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_length: int = MAX_LENGTH,
    ) -> "T5TextEncoder":
        from transformers import T5EncoderModel

        path = os.fspath(path)
        _check_dir(path)
        tokenizer = load_tokenizer(path)
        try:
            model, info = T5EncoderModel.from_pretrained(
                path, local_files_only=True, output_loading_info=True, **_dtype_kwarg(dtype)
            )
        except RuntimeError as err:  # shape mismatches
            raise CheckpointError(f"T5 checkpoint in {path!r} does not match its config.json: {err}") from err
        missing = sorted(info.get("missing_keys") or [])
        mismatched = sorted(info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise CheckpointError(
                f"T5 checkpoint in {path!r} does not match T5EncoderModel: missing keys {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; mismatched {mismatched[:5]}"
            )
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(model, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self._live().device

    @property
    def dtype(self) -> torch.dtype:
        return self._live().dtype

    def _live(self):
        if self.model is None:
            raise RuntimeError("T5TextEncoder was released; build a new one to encode again")
        return self.model

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (already prepared) -> (embeddings (B, max_length, d_model), mask (B, max_length))."""
        if isinstance(texts, str):
            texts = [texts]
        model = self._live()
        tokens = self.tokenize(texts)
        ids = tokens["input_ids"].to(model.device)
        mask = tokens["attention_mask"].to(model.device)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out, mask

    def release(self) -> None:
        """Drop the model (T5-XXL is 19 GB in fp32) and return its memory to the allocator."""
        on_cuda = self.model is not None and self.model.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def build_t5_encoder(config: dict | None = None, device: str | torch.device = "meta"):
    """A ``T5EncoderModel`` from a config dict (default T5-XXL), e.g. on the meta device to
    count parameters without allocating them."""
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):
        return T5EncoderModel(T5Config(**dict(config or T5_XXL_CONFIG)))
