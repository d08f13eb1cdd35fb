"""The verdict question (PAPER.md, verbatim), its answer parser, and the verdict rule.

Two ways to read the model's answer:
  - logits mode: teacher-force the answer prefix "The score is" (and the tokens both answers start with,
    see `answer_tokens`) and compare the next-token probabilities of "1" and "0":
    p_aligned = P(1) / (P(1) + P(0)). One forward pass, no sampling.
  - generate mode: let the model answer freely and parse "The score is 0/1" (Janus-Pro's format) or a
    leading "Yes"/"No" (Show-o's habit). Anything else is *unparsed*: counted apart, never 0 or 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

VERDICT_QUESTION = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language. Does this image "
    "describe {prompt}? If it describes the scene, score 1; if it does not fully describe, score 0. Please "
    "answer in the following format: The score is {{your score}}."
)
ANSWER_PREFIX = "The score is"
# The caption request: what the shapes-world model is pretrained to answer with its prompt (gapray/world/pretrain.py)
# and the learning-dynamics diagnostic teacher-forces (gapray/diagnostics.py).
CAPTION_REQUEST = "Describe this image."

_SCORE = re.compile(r"score\s+is\s*[:=]?\s*\{?\s*([01])(?![0-9.]*[0-9])", re.IGNORECASE)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def verdict_question(prompt: str) -> str:
    return VERDICT_QUESTION.format(prompt=prompt.strip().rstrip("."))


def parse_answer(text: str) -> float:
    """1.0 / 0.0 for a parsed answer, NaN for an unparsed one."""
    m = _SCORE.search(text)
    if m:
        return float(m.group(1))
    m = _YES_NO.match(text)
    if m:
        return 1.0 if m.group(1).lower() == "yes" else 0.0
    return math.nan


def to_verdict(p_aligned: float, threshold: float = 0.5) -> int | None:
    """1 aligned, 0 misaligned, None unparsed (NaN)."""
    if p_aligned != p_aligned:  # NaN
        return None
    return int(p_aligned >= threshold)


@dataclass(frozen=True)
class AnswerTokens:
    """How a tokenizer writes " 1" / " 0" after the answer prefix: `shared_suffix_ids`, the tokens both
    continuations start with (a lone space token in byte-level BPEs that split digits, "Ġ" then "1", or in
    Llama-style sentencepiece, "▁" then "1"; empty where the space folds into the digit or is no token),
    then one token each, `one` and `zero`. Logits mode teacher-forces the shared tokens and compares the
    next-token logits of `one` and `zero`: P(shared) is common to both answers and cancels in the ratio."""
    shared_suffix_ids: tuple[int, ...]
    one: int
    zero: int


def answer_tokens(tokenizer, prefix_text: str) -> AnswerTokens:
    """Encode `prefix_text` + " 1" and + " 0"; their first differing position holds the answer tokens and
    everything between the prefix's own tokens and it is the shared suffix."""
    base = tokenizer.encode(prefix_text, add_special_tokens=False)
    one, zero = (tokenizer.encode(f"{prefix_text} {d}", add_special_tokens=False) for d in ("1", "0"))
    if one[:len(base)] != base or zero[:len(base)] != base:
        # Appending tokens to the encoded prefix could then never reproduce how the answer is written.
        raise ValueError(f"writing the answer retokenizes the prefix {prefix_text[-30:]!r}")
    k = next((i for i, (a, b) in enumerate(zip(one, zero)) if a != b), None)
    if k is None or tokenizer.unk_token_id in (one[k], zero[k]):
        raise ValueError("tokenizer does not distinguish the answers '1' and '0'")
    if len(one) != k + 1 or len(zero) != k + 1:
        # P(answer) would need more than one next-token logit: the ratio of two logits would be wrong.
        raise ValueError("the answers '1' and '0' are not one token each after their shared tokens")
    return AnswerTokens(tuple(one[len(base):k]), one[k], zero[k])

