"""T5 text encoder wrapper: a tiny random T5 and a tokenizer built offline, saved in the HF layout."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from models.loading import CheckpointError  # noqa: E402
from models.t5 import T5TextEncoder  # noqa: E402
from tests.opensora_util import build_t5, build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    build_t5().save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    return d


def test_encode_shapes_mask_and_values(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir)
    assert enc.output_dim == 16 and enc.dtype == torch.float32 and enc.max_length == 300
    texts = ["a cat sitting on the mat. aesthetic score: 6.5.", "a dog"]
    emb, mask = enc.encode(texts)
    assert emb.shape == (2, 300, 16) and mask.shape == (2, 300)
    n_tokens = [len(enc.tokenizer(t)["input_ids"]) for t in texts]
    assert mask.sum(1).tolist() == n_tokens and n_tokens[1] == 3  # "a", "dog", "</s>"
    assert mask[1, :3].tolist() == [1, 1, 1] and mask[1, 3:].sum() == 0
    ids = enc.tokenize(texts)["input_ids"]
    assert ids[1, 2] == 1 and ids[1, 3:].eq(0).all()  # EOS then <pad>
    ref = build_t5()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(emb, ref)


def test_truncation_to_300(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir)
    emb, mask = enc.encode(["a cat " * 400])
    assert emb.shape == (1, 300, 16) and mask.sum() == 300


def test_dtype_and_release(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, dtype=torch.bfloat16)
    emb, _ = enc.encode("a cat")
    assert emb.dtype == torch.bfloat16
    enc.release()
    assert enc.model is None
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["a cat"])


def test_missing_files_error(tmp_path):
    with pytest.raises(CheckpointError) as err:
        T5TextEncoder.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "config.json" in msg and "spiece.model" in msg
    assert f"huggingface-cli download DeepFloyd/t5-v1_1-xxl --local-dir {tmp_path}" in msg


def test_missing_weight_is_an_error_not_random_init(t5_dir, tmp_path):
    import shutil

    for f in t5_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    weights["encoder.final_layernorm.weight"] = weights.pop("encoder.final_layer_norm.weight")
    safetensors_torch.save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="encoder.final_layer_norm.weight"):
        T5TextEncoder.from_pretrained(tmp_path)


def test_shape_mismatch_is_an_error(t5_dir, tmp_path):
    import json
    import shutil

    for f in t5_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_ff"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        T5TextEncoder.from_pretrained(tmp_path)


def test_spiece_only_directory_like_deepfloyd(t5_dir, tmp_path):
    """The published repo ships spiece.model (no tokenizer.json); converting it needs protobuf."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import io
    import json
    import shutil

    corpus = ["a cat sitting on the mat", "a dog", "aesthetic score: 6.5.", "sunset over the ocean"] * 10
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    (tmp_path / "spiece.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    for name in ("config.json", "model.safetensors"):
        shutil.copy(t5_dir / name, tmp_path / name)
    enc = T5TextEncoder.from_pretrained(tmp_path)
    emb, mask = enc.encode(["a cat"])
    assert emb.shape == (1, 300, 16) and int(mask.sum()) >= 2


def test_t5_xxl_encoder_parameter_count_on_meta():
    from models.param_count import t5_xxl_encoder_param_count

    assert t5_xxl_encoder_param_count() == 4_762_310_656
