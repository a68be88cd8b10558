import os

import pytest
import torch
from safetensors.torch import save_file

from models.loading import CheckpointError, load_stdit3, save_checkpoint
from models.stdit3 import build_stdit3, get_config


@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=3)
    d = tmp_path / "ckpt"
    save_checkpoint(str(d), model.state_dict(), cfg.to_dict())
    return model, d


def test_roundtrip_from_directory_and_file(tiny_ckpt):
    model, d = tiny_ckpt
    loaded = load_stdit3(str(d))
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    x, y, m = torch.randn(1, 4, 2, 4, 6), torch.randn(1, 16, 32), torch.ones(1, 16)
    t = torch.tensor([321.0])
    torch.testing.assert_close(loaded(x, t, y, m), model(x, t, y, m))
    from_file = load_stdit3(str(d / "model.safetensors"), config=get_config("STDiT3-tiny"))
    torch.testing.assert_close(from_file(x, t, y, m), model(x, t, y, m))


def test_load_converts_dtype(tiny_ckpt):
    _, d = tiny_ckpt
    m = load_stdit3(str(d), dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def _write(d, state):
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(d, "model.safetensors"))


def test_missing_key_is_listed(tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    state = dict(model.state_dict())
    del state["t_block.1.weight"]
    _write(tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"missing keys: t_block\.1\.weight \(1 in all\)"):
        load_stdit3(str(tmp_path / "bad"), config=get_config("STDiT3-tiny"))


def test_wrong_shape_and_unexpected_keys_are_listed(tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    state = dict(model.state_dict())
    state["final_layer.linear.weight"] = torch.zeros(5, 64)
    state["extra.weight"] = torch.zeros(1)
    _write(tmp_path / "bad", state)
    with pytest.raises(CheckpointError) as e:
        load_stdit3(str(tmp_path / "bad"), config=get_config("STDiT3-tiny"))
    msg = str(e.value)
    assert "final_layer.linear.weight (5, 64) != (32, 64)" in msg
    assert "unexpected keys: extra.weight" in msg


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stdit3(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_stdit3(str(tmp_path / "empty"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_stdit3(str(tmp_path / "junk.safetensors"), config=get_config("STDiT3-tiny"))
    no_cfg = tmp_path / "nocfg"
    _write(no_cfg, build_stdit3(get_config("STDiT3-tiny")).state_dict())
    with pytest.raises(CheckpointError, match="no config.json"):
        load_stdit3(str(no_cfg))
