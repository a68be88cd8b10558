"""DemoPipeline.prompt_warnings: what the demo text encoder silently loses of a prompt."""

import numpy as np
import pytest
import torch

from runner.demo import data as demo_data
from runner.config import ModelConfig
from runner.families import build_pipeline
from runner.families.base import quoted


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(ModelConfig(family="demo", weights="builtin:demo"), torch.device("cpu"), torch.float32)


def test_in_vocabulary_prompts_have_no_warnings(pipe):
    rng = np.random.default_rng(0)
    _, train = demo_data.make_batch(rng, 32, 4, 16, "train", "edge")
    for caption in [*demo_data.HELDOUT_CAPTIONS, *train, "A Yellow triangle stays still, on a textured background!"]:
        assert pipe.prompt_warnings(caption) == [], caption


def test_ids_of_in_vocabulary_prompts_are_unchanged(pipe):
    # The shipped model was trained on exactly these ids (recorded before prompt_warnings existed).
    ids, mask = pipe.tokenizer(["a red circle moves left on a dark background",
                                "A Yellow triangle stays still on a textured background!"])
    assert ids.tolist() == [[3, 16, 6, 14, 11, 15, 3, 8, 4, 2, 0, 0, 0, 0, 0, 0],
                            [3, 24, 22, 19, 20, 15, 3, 21, 4, 2, 0, 0, 0, 0, 0, 0]]
    assert mask.sum(1).tolist() == [10, 10]


def test_words_past_the_length_are_named(pipe):
    prompt = "a red circle moves left on a dark background and a red circle moves left quickly again"
    assert pipe.tokenizer.max_length == 16  # 15 words and <eos>
    assert pipe.prompt_warnings(prompt) == [
        "the demo text encoder keeps 15 words; dropped: 'quickly', 'again'",
        "words the demo model does not know (read as <unk>): 'and'",
    ]
    # the named words are exactly those the encoder never sees
    ids, _ = pipe.tokenizer([prompt])
    assert torch.equal(ids, pipe.tokenizer([prompt.replace("quickly again", "")])[0])
    assert not torch.equal(ids, pipe.tokenizer([prompt.replace("left quickly", "right quickly")])[0])


def test_unknown_words_are_named_once_in_order(pipe):
    prompt = "a zebra circle, a zebra square and a giraffe"
    assert pipe.prompt_warnings(prompt) == [
        "words the demo model does not know (read as <unk>): 'zebra', 'and', 'giraffe'"]
    ids, _ = pipe.tokenizer([prompt])
    assert ids[0, 1] == pipe.tokenizer.index["<unk>"]
    # an unknown word that was dropped anyway is reported as dropped, not as <unk>
    long = "a red circle moves left on a dark background a red circle moves left on zebra"
    assert pipe.prompt_warnings(long) == ["the demo text encoder keeps 15 words; dropped: 'zebra'"]


def test_emoji_only_prompt_follows_no_caption(pipe):
    warnings = pipe.prompt_warnings("🦓 🦓🐘")
    assert warnings == ["the demo text encoder reads only the letters a-z; skipped: '🦓', '🦓🐘'",
                        "the prompt has no words the demo model knows: the video follows no caption"]
    _, mask = pipe.tokenizer(["🦓 🦓🐘"])
    assert mask.sum() == 1  # <eos> alone
    assert pipe.prompt_warnings("zebra giraffe")[-1].startswith("the prompt has no words the demo model knows")


def test_digits_and_accents_are_skipped_characters(pipe):
    assert pipe.prompt_warnings("3 red circles, café") == [
        "words the demo model does not know (read as <unk>): 'circles', 'caf'",
        "the demo text encoder reads only the letters a-z; skipped: '3', 'é'"]


def test_long_lists_are_cut():
    assert quoted(list("abc")) == "'a', 'b', 'c'"
    assert quoted([f"w{i}" for i in range(13)], limit=10).endswith("'w9' and 3 more")
