"""Prompt processing of Open-Sora 1.2: score suffixes and the caption normalisation."""

import pytest

from models.caption import append_scores, basic_clean, clean_caption, prepare_prompt, prepare_prompts, strip_html


def test_aesthetic_suffix_and_double_clean():
    assert prepare_prompt("A Cat on a MAT.") == "a cat on a mat. aesthetic score: 6.5."
    assert prepare_prompt("a cat", aes=None) == "a cat"
    assert prepare_prompt("a cat", aes=5, flow=4, camera_motion="pan left") == (
        "a cat aesthetic score: 5.0. motion score: 4.0. camera motion: pan left."
    )
    # suffixes are not appended twice
    assert append_scores("x aesthetic score: 6.0.") == "x aesthetic score: 6.0."
    assert prepare_prompt("  Hello  World ", aes=None, clean=False) == "hello  world"
    assert prepare_prompts(["A", "B"], aes=None) == ["a", "b"]


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("A beautiful sunset over the ocean.", "a beautiful sunset over the ocean."),
        ("Visit https://www.example.com/x for <b>MORE</b> info", "visit for more info"),
        ("this-is-my-cute-cat_and_dog", "this is my cute cat and dog"),
        ("Hello,world.this is/a test : ok #123 1234567 192.168.0.1 @user", "hello, world. this is a test: ok"),
        ("A flower \u2014 in a garden \u2013 with \u201cquotes\u201d and \u2018single\u2019", 'a flower - in a garden - with "quotes" and \'single'),
        ("\u4e2d\u6587 prompt with CJK \u6f22\u5b57 characters", "prompt with cjk characters"),
        ("FREE SHIPPING worldwide! download free png images, page 12", "worldwide!"),
        ("photo 1920x1080 of IMG_2034.jpg, code jc6640...", "photo of , code"),
        ("(approx) [note] {json} | a * b ~ c", "approx note json a b c"),
        ('  "A drone shot of a city at night"  ', "a drone shot of a city at night"),
        ("Line one\\nLine two 1:23 ", "line one line two 1:23"),
        ("%20spaced+out", "spaced out"),
        ("\uff21\uff22\uff23 \ufb01ne", "abc fine"),
    ],
)
def test_clean_caption_rules(raw, clean):
    assert clean_caption(clean_caption(raw)) == clean


def test_html_and_basic_clean():
    assert strip_html("<p>a &amp; b</p><br/>c") == "a & bc"
    assert basic_clean("  \u201cx\u201d\x07 &amp;amp; ") == '"x" &'
