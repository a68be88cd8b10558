"""The opensora-v1.2 pipeline on tiny random checkpoints laid out like the published ones:
DIR/stdit3 (hpcai-tech/OpenSora-STDiT-v3), DIR/vae (hpcai-tech/OpenSora-VAE-v1.2), DIR/t5
(DeepFloyd/t5-v1_1-xxl), all with the real key names and small widths."""

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from hydra.errors import HydraException  # noqa: E402

from models.caption import prepare_prompt  # noqa: E402
from models.loading import CheckpointError  # noqa: E402
from models.stdit3 import build_stdit3  # noqa: E402
from runner.config import UserError, resolve_presets  # noqa: E402
from runner.assemble import assemble  # noqa: E402
from runner.generate import generate, generate_one  # noqa: E402
from runner.families.opensora import OpenSoraPipeline, build_opensora_pipeline  # noqa: E402
from runner.video import read_video  # noqa: E402
from tests.helpers import make_cfg  # noqa: E402
from tests.opensora_util import TINY_DIT, TINY_T5, build_t5, build_tokenizer, tiny_vae  # noqa: E402

FAST = ("sampler.num_steps=2", "progress=false", "prompt=a cat sitting on the mat")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(weights_dir):
    return build_opensora_pipeline(make_cfg("model=opensora-v1.2", f"model.weights_dir={weights_dir}").model,
                                   torch.device("cpu"), torch.float32)


def test_loads_strictly_from_directory(pipe):
    ref = build_stdit3(TINY_DIT, seed=1).state_dict()
    got = pipe.dit.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    vae_ref = tiny_vae().state_dict()
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in vae_ref.items())
    assert pipe.vae.micro_frame_size == 17
    desc = pipe.describe()
    assert desc["family"] == "opensora-v1.2" and desc["parameters"]["t5"] > 0
    assert pipe.latent_shape(17, 32, 48) == (4, 5, 4, 6)
    assert pipe.latent_shape(51, 32, 48)[1] == 15


def test_encode_text_conditioning_and_t5_released(pipe, weights_dir):
    assert pipe.text_encoder is not None  # loaded with the pipeline
    cond = pipe.encode_text(["a cat", "a dog sitting on the mat"])
    # T5 is freed before sampling: no model, no parameters left anywhere
    assert pipe.text_encoder is None
    # aes suffix appended and cleaned before tokenising; trimmed to the longest prompt
    t5 = build_t5()
    tok = build_tokenizer()
    texts = ["a dog sitting on the mat aesthetic score: 6.5."]
    ids = tok(texts, max_length=300, padding="max_length", truncation=True, return_tensors="pt")
    n = int(ids["attention_mask"].sum())
    assert cond.y.shape == (4, n, TINY_T5["d_model"]) and cond.mask.shape == (2, n)
    ref = t5(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[:, :n]
    torch.testing.assert_close(cond.y[1:2], ref)
    # null half: the DiT's y_embedding, and the cond mask reused for it
    null = pipe.dit.y_embedder.y_embedding[:n]
    assert torch.equal(cond.y[2], null) and torch.equal(cond.y[3], null)
    one = cond.select(0)
    assert one.y.shape[0] == 2 and one.mask.shape == (1, int(cond.mask[0].sum()))
    # a second call loads T5 again and gives the same result
    again = pipe.encode_text(["a cat", "a dog sitting on the mat"])
    torch.testing.assert_close(again.y, cond.y)
    assert pipe.text_encoder is None


def test_prompt_warnings_name_t5_truncation_and_unknown_characters(pipe, weights_dir):
    tok = build_tokenizer()

    def prompt(n):  # n T5 tokens once the aesthetic suffix and </s> are added ("▁cat" is one token)
        k = n - len(tok(prepare_prompt("", aes=6.5))["input_ids"])
        return " ".join(["cat"] * k)

    assert len(tok(prepare_prompt(prompt(300), aes=6.5))["input_ids"]) == 300
    pipe.load_text_encoder()
    for loaded in (True, False):  # T5's own tokenizer, then (T5 released) the tokenizer alone
        assert (pipe.text_encoder is not None) == loaded
        assert pipe.prompt_warnings("a cat sitting on the mat") == []
        assert pipe.prompt_warnings(prompt(300)) == []
        assert pipe.prompt_warnings(prompt(305)) == [
            "T5 keeps 300 tokens and the prompt with its score suffix has 305: the last 5 are dropped, "
            "from ': 6.5.' on (the suffix with them)"]
        pipe.release_text_encoder()
    assert pipe.text_encoder is None  # warnings never load the model
    # what the warning names is what truncation cuts: 299 tokens and </s> remain
    full = tok(prepare_prompt(prompt(305), aes=6.5))["input_ids"]
    kept = tok(prepare_prompt(prompt(305), aes=6.5), max_length=300, truncation=True)["input_ids"]
    assert kept == full[:299] + [1] and tok.decode(full[299:-1]).strip() == ": 6.5."
    assert pipe.prompt_warnings("a cat 🦓 on the mat") == ["characters T5 does not know (read as <unk>): '🦓'"]
    plain = OpenSoraPipeline(pipe.dit, pipe.vae, str(weights_dir), torch.float32, aes=None)
    assert plain.prompt_warnings(prompt(305)) == []  # 298 tokens without the suffix
    assert plain.prompt_warnings(" ".join(["cat"] * 310)) == [
        "T5 keeps 300 tokens and the prompt has 311: the last 11 are dropped, from 'cat cat cat cat cat cat cat cat ...' on"]


def test_conditioning_size_is_bf16_rounded_and_reaches_the_dit(pipe, monkeypatch):
    assert pipe.conditioning_size(480, 854) == (480, 856)
    assert pipe.conditioning_size(720, 1280) == (720, 1280)
    seen = []
    embed = pipe.dit.embed
    monkeypatch.setattr(pipe.dit, "embed", lambda *a, **k: (seen.append((k["height"], k["width"])), embed(*a, **k))[1])
    cfg = resolve_presets(make_cfg("model=opensora-v1.2", "model.weights_dir=x", "height=16", "width=259",
                                   "num_frames=1", *FAST))
    job = assemble(cfg, pipe=pipe)
    video, latent, _ = generate_one(job, cfg, "a cat", seed=0, cond=pipe.encode_text(["a cat"]))
    job.release()
    assert set(seen) == {(16, 260)}  # 259 -> 260 in bf16
    assert latent.shape == (1, 4, 1, 2, 32) and video.shape == (3, 1, 16, 256)  # 259 // 8 * 8


def test_decode_chunks_is_the_slice_of_decode(pipe):
    z = torch.randn(1, 4, 7, 2, 3, generator=torch.Generator().manual_seed(0))
    assert pipe.frames_for_latents(7) == 17 + 5  # 5 latents -> 17 frames, 2 -> 5
    full = pipe.decode(z)
    assert full.shape == (1, 3, 22, 16, 24) and full.abs().max() <= 1
    chunks = pipe.chunks(22)
    assert [(c.latent_start, c.latent_stop, c.frame_start, c.frame_stop) for c in chunks] == [(0, 5, 0, 17), (5, 7, 17, 22)]
    torch.testing.assert_close(pipe.decode_chunks(z, 22, [1]), full[:, :, 17:])


def test_end_to_end_generate(weights_dir, tmp_path):
    cfg = make_cfg("model=opensora-v1.2", f"model.weights_dir={weights_dir}", "height=32", "width=48",
                   "num_frames=17", f"output_dir={tmp_path}", "save_latent=true", *FAST)
    (rep,) = generate(cfg)
    assert read_video(rep["output"]).shape == (17, 32, 48, 3)
    assert torch.load(rep["output"][:-4] + ".latent.pt").shape == (1, 4, 5, 4, 6)
    report = json.loads(open(rep["output"][:-4] + ".json").read())
    assert report["model"]["family"] == "opensora-v1.2" and report["dtype"] == "float32"
    phases = report["memory"]["phases"]
    assert set(phases) == {"loading", "text_encoding", "sampling", "decoding"}
    for p in phases.values():
        assert p["host_peak_rss_mb"] > 0 and p["seconds"] >= 0
    assert report["memory"]["host_peak_rss_mb"] >= max(p["host_peak_rss_mb"] for p in phases.values())
    assert {"text_encoding_s", "sampling_s", "decoding_s"} <= set(report["timings"])


@pytest.mark.parametrize("part,repo", [("stdit3", "hpcai-tech/OpenSora-STDiT-v3"),
                                       ("vae", "hpcai-tech/OpenSora-VAE-v1.2"),
                                       ("t5", "DeepFloyd/t5-v1_1-xxl")])
def test_missing_part_names_files_and_download_command(weights_dir, tmp_path, part, repo):
    root = tmp_path / "w"
    shutil.copytree(weights_dir, root)
    shutil.rmtree(root / part)
    cfg = make_cfg("model=opensora-v1.2", f"model.weights_dir={root}", f"output_dir={tmp_path / 'o'}", *FAST)
    with pytest.raises(CheckpointError) as err:
        generate(cfg)
    msg = str(err.value)
    assert f"huggingface-cli download {repo} --local-dir {root / part}" in msg
    assert "config.json" in msg and msg.count("huggingface-cli download") == 1
    assert {"stdit3": "model.safetensors", "vae": "model.safetensors", "t5": "spiece.model"}[part] in msg
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_mismatched_part_is_a_checkpoint_error(weights_dir, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(weights_dir, root)
    cfg_file = root / "stdit3" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        build_opensora_pipeline(make_cfg("model=opensora-v1.2", f"model.weights_dir={root}").model,
                                torch.device("cpu"), torch.float32)


def test_weights_dir_required_before_loading(tmp_path):
    with pytest.raises(UserError, match="needs model.weights_dir"):
        generate(make_cfg("model=opensora-v1.2", f"output_dir={tmp_path}", *FAST))


# ---- presets ------------------------------------------------------------------------------------
def test_model_defaults_are_240p_2s():
    cfg = resolve_presets(make_cfg("model=opensora-v1.2"))
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.fps) == (240, 426, 51, 24)
    assert cfg.model.dtype == "auto" and cfg.model.text_dtype == "float32" and cfg.model.arch == "STDiT3-XL/2"
    assert (cfg.sampler.num_steps, cfg.sampler.cfg_scale, cfg.sampler.use_timestep_transform) == (30, 7.0, True)


@pytest.mark.parametrize("overrides,size", [
    (["preset=720p-4s"], (720, 1280, 102)),
    (["model=opensora-v1.2", "preset=480p-2s"], (480, 854, 51)),
    (["preset=720p-4s", "aspect_ratio=16:9", "duration=8s"], (1280, 720, 204)),
    (["model=opensora-v1.2", "resolution=360p", "duration=68"], (360, 640, 68)),
])
def test_presets_resolve(overrides, size):
    cfg = resolve_presets(make_cfg(*overrides))
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.fps) == (*size, 24)


def test_unknown_preset_is_hydras_error():
    with pytest.raises(HydraException, match="preset/4k-2s"):
        make_cfg("preset=4k-2s")


@pytest.mark.parametrize("override,valid", [("resolution=4k", "144p, 240p"), ("aspect_ratio=16:10", "9:16"),
                                            ("duration=3s", "2s, 4s")])
def test_unknown_preset_values_list_valid_ones(tmp_path, override, valid):
    with pytest.raises(UserError, match=valid):
        generate(make_cfg("preset=720p-2s", override, f"output_dir={tmp_path}", *FAST))
