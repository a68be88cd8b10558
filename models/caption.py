"""Prompt processing of Open-Sora 1.2 before T5 (reference section 2.2).

``prepare_prompt`` does what ``scripts/inference.py`` does to each prompt: append
" aesthetic score: 6.5." (and optionally " motion score: x." / " camera motion: y."), then
run ``clean_caption`` twice.

``clean_caption`` is this project's own implementation of the PixArt / DeepFloyd caption
normalisation that Open-Sora copies (``opensora/models/text_encoder/t5.py``), written from the
list of rules and using only the standard library (no ftfy, no BeautifulSoup). Implemented, in
the reference's order:

 1. URL-unquote (``+`` -> space, ``%xx``), strip, lower-case; ``<person>`` -> ``person``;
 2. remove URLs: ``http(s):`` + slashes, and words ending in .com/.co/.ru/.net/.org/.edu/.gov/.it
    with their path;
 3. remove HTML tags, keeping the text (stdlib ``html.parser``; entities are decoded);
 4. remove ``@nicknames`` and CJK characters (U+31C0-U+9FFF blocks listed by the reference);
 5. unify every kind of dash to ``-`` and every kind of quote to ``"`` or ``'``; drop ``&quot``
    and ``&amp``;
 6. remove IP addresses, trailing article ids (``1:23``), literal ``\\n``, ``#123``, ``#12345...``,
    numbers of 6+ digits and file names with image/video/document extensions;
 7. collapse repeated quotes to one ``"``; runs of dots to a space; "bad" punctuation
    (``#®•©™&@·º½¾¿¡§~()[]{}|\\/*``) to a space; a lone `` . `` to a space;
 8. more than 3 dashes/underscores in total: all of them become spaces (``this-is-my-cat``);
 9. basic clean (see ``basic_clean``), then HTML-unescape twice;
10. remove letter-digit codes (``jc6640``, ``jc6640vc``, ``6640vc231``, ``j2d1a2a``), shop spam
    ("free shipping", "download free", "click for/on x", "png images", "page 3"), and sizes
    such as ``1920x1080``;
11. normalise `` : `` to ``: ``, add a space after ``,`` ``.`` ``/`` that follow a non-digit and
    precede a word character, collapse whitespace;
12. strip one pair of enclosing quotes, a leading ``' _ , - : ;``, a trailing ``' _ , - : +``, and
    a caption that is a single ``.token``.

Not implemented: ftfy's mojibake repair (re-decoding text that was decoded with the wrong
codec) and its rarer fixes. ``basic_clean`` covers the ftfy fixes that matter for typed
prompts: Unicode NFC, full-width ASCII to ASCII, Latin ligatures, curly quotes, control
characters and terminal escape codes, CRLF line breaks.
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse
from html.parser import HTMLParser

AESTHETIC_SCORE = 6.5


# ---- prompt suffixes ------------------------------------------------------------------------
def append_scores(
    prompt: str,
    aes: float | None = AESTHETIC_SCORE,
    flow: float | None = None,
    camera_motion: str | None = None,
) -> str:
    """Append the score suffixes Open-Sora 1.2 was trained with, unless already present."""
    if aes is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {aes:.1f}."
    if flow is not None and "motion score:" not in prompt:
        prompt = f"{prompt} motion score: {flow:.1f}."
    if camera_motion is not None and "camera motion:" not in prompt:
        prompt = f"{prompt} camera motion: {camera_motion}."
    return prompt


def prepare_prompt(
    prompt: str,
    aes: float | None = AESTHETIC_SCORE,
    flow: float | None = None,
    camera_motion: str | None = None,
    clean: bool = True,
) -> str:
    """Suffixes, then ``clean_caption`` twice (as at training time); ``clean=False`` only
    lower-cases and strips."""
    prompt = append_scores(prompt, aes=aes, flow=flow, camera_motion=camera_motion)
    if clean:
        return clean_caption(clean_caption(prompt))
    return prompt.lower().strip()


def prepare_prompts(prompts, **kwargs) -> list[str]:
    return [prepare_prompt(p, **kwargs) for p in prompts]


# ---- HTML -----------------------------------------------------------------------------------
class _TextOnly(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


def strip_html(text: str) -> str:
    """Text content of ``text`` parsed as HTML (tags dropped, entities decoded)."""
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


# ---- basic clean (a subset of ftfy.fix_text) -----------------------------------------------
_LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"}
_CURLY = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'}
_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_WIDTH[0x3000] = 0x20
_TRANSLATE = str.maketrans({**_LIGATURES, **_CURLY, **{chr(k): chr(v) for k, v in _WIDTH.items()}})
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def basic_clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = _TERMINAL_ESCAPE.sub("", text)
    text = _CONTROL.sub("", text)
    text = unicodedata.normalize("NFC", text).translate(_TRANSLATE)
    return html.unescape(html.unescape(text)).strip()


# ---- regex rules ----------------------------------------------------------------------------
def _rules(*pairs):
    return [(re.compile(p), r) for p, r in pairs]


_TLD = r"(?:com|co|ru|net|org|edu|gov|it)"
_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

_BEFORE_HTML = _rules(
    (r"<person>", "person"),
    (rf"\b(?:https?:(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+\.{_TLD}[\w/-]*\b/?(?!@))", ""),
    (rf"\b(?:www:(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+\.{_TLD}[\w/-]*\b/?(?!@))", ""),
)

_DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
_BAD_PUNCT = "#®•©™&@·º½¾¿¡§~()\\[\\]{}|\\\\/*"

_AFTER_HTML = _rules(
    (r"@[\w\d]+\b", ""),
    # CJK strokes ... CJK unified ideographs (U+31C0-U+31FF, U+3200-U+4DFF, U+4E00-U+9FFF)
    ("[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+", ""),
    (f"[{_DASHES}]+", "-"),
    ("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]", '"'),
    ("[\u2018\u2019]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"\S+\.{_FILE_EXT}", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"\.{2,}", " "),
    (f"[{_BAD_PUNCT}]+", " "),
    (r"\s+\.\s+", " "),
)

_DASH_OR_UNDERSCORE = re.compile(r"[-_]")

_AFTER_BASIC = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b{_FILE_EXT}(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),
    (r"\s+", " "),
    # the reference does not strip here, so a leading/trailing space can block these
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(rules, text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def clean_caption(caption) -> str:
    """One pass of the caption normalisation documented in the module docstring."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = strip_html(text)
    text = _apply(_AFTER_HTML, text)
    if len(_DASH_OR_UNDERSCORE.findall(text)) > 3:
        text = _DASH_OR_UNDERSCORE.sub(" ", text)
    text = basic_clean(text)
    text = _apply(_AFTER_BASIC, text)
    return text.strip()
