"""Tiny random Open-Sora 1.2 parts in the published layouts, for the tests: a T5 and its tokenizer
built offline (DeepFloyd/t5-v1_1-xxl), a VAE (hpcai-tech/OpenSora-VAE-v1.2) and an STDiT3
(hpcai-tech/OpenSora-STDiT-v3), all with the real key names and small widths.

transformers, tokenizers and diffusers are imported where they are used, so importing this module
needs none of them; the test modules that use it skip without them.
"""

import dataclasses
import json

import torch
from safetensors import torch as safetensors_torch

from models.loading import save_checkpoint
from models.stdit3 import STDiT3Config, build_stdit3
from models.t5 import T5_XXL_CONFIG
from models.vae import SDXL_VAE_CONFIG, OpenSoraVAE
from models.vae_temporal import TemporalVAEConfig

WORDS = "a cat dog sitting on the mat sunset over ocean aesthetic score motion camera pan left . : , 6 5".split()


def build_tokenizer():
    """A T5-like Unigram tokenizer (<pad>=0, </s>=1, <unk>=2, Metaspace, EOS appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.:,"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


TINY_T5 = dict(
    T5_XXL_CONFIG, vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2
)


def build_t5(seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**TINY_T5)).eval()


# Tiny widths, real structure (4 spatial levels -> 8x, 4 temporal levels -> 4x in time).
TINY_SPATIAL = dict(SDXL_VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
TINY_TEMPORAL = TemporalVAEConfig(filters=8, num_res_blocks=2, num_groups=4)

# config.json of hpcai-tech/OpenSora-VAE-v1.2 (a transformers VideoAutoencoderPipelineConfig)
PUBLISHED_CONFIG = {
    "architectures": ["VideoAutoencoderPipeline"],
    "model_type": "VideoAutoencoderPipeline",
    "cal_loss": False,
    "freeze_vae_2d": False,
    "from_pretrained": None,
    "micro_frame_size": 17,
    "scale": [3.85, 2.32, 2.33, 3.06],
    "shift": [-0.1, 0.34, 0.27, 0.98],
    "vae_2d": {
        "type": "VideoAutoencoderKL",
        "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
        "subfolder": "vae",
        "micro_batch_size": 4,
        "local_files_only": False,
    },
    "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
    "torch_dtype": "float32",
}


def tiny_vae(seed=0, micro_batch_size=None):
    torch.manual_seed(seed)
    vae = OpenSoraVAE(TINY_SPATIAL, TINY_TEMPORAL, micro_batch_size=micro_batch_size).eval()
    with torch.no_grad():  # non-trivial norms so every parameter matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def save_hf_layout(vae, directory, config=PUBLISHED_CONFIG):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    safetensors_torch.save_file(sd, str(directory / "model.safetensors"))
    return directory


# caption_channels = the tiny T5's d_model; 300 tokens as published (the null caption's length).
TINY_DIT = STDiT3Config(depth=1, hidden_size=32, num_heads=2, caption_channels=TINY_T5["d_model"])


def write_weights_dir(root):
    """root/stdit3, root/vae, root/t5 as `model.weights_dir` expects them -> root."""
    dit = build_stdit3(TINY_DIT, seed=1)
    save_checkpoint(str(root / "stdit3"), dit.state_dict(),
                    {"architectures": ["STDiT3"], "model_type": "STDiT3", **TINY_DIT.to_dict()})
    arch = {"spatial": TINY_SPATIAL, "temporal": dataclasses.asdict(TINY_TEMPORAL)}
    save_hf_layout(tiny_vae(), root / "vae", {**PUBLISHED_CONFIG, "arch": arch})
    build_t5().save_pretrained(root / "t5")
    build_tokenizer().save_pretrained(root / "t5")
    return root
