"""The verdict question (PAPER.md, verbatim), its answer parser, and the verdict rule.

Two ways to read the model's answer:
  - logits mode: teacher-force the answer prefix "The score is" and compare the next-token
    probabilities of "1" and "0": p_aligned = P(1) / (P(1) + P(0)). One forward pass, no sampling.
  - generate mode: let the model answer freely and parse "The score is 0/1" (Janus-Pro's format) or a
    leading "Yes"/"No" (Show-o's habit). Anything else is *unparsed*: counted apart, never 0 or 1.
"""

from __future__ import annotations

import math
import re

VERDICT_QUESTION = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language. Does this image "
    "describe {prompt}? If it describes the scene, score 1; if it does not fully describe, score 0. Please "
    "answer in the following format: The score is {{your score}}."
)
ANSWER_PREFIX = "The score is"

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


def answer_token_ids(tokenizer, prefix_text: str) -> tuple[int, int]:
    """Token ids of "1" and "0" as the tokenizer writes them right after `prefix_text`.

    BPE tokenizers fold the space into the digit (" 1"), word-level ones do not; encoding both
    continuations and taking the first token that differs from the prefix covers both.
    """
    base = tokenizer.encode(prefix_text, add_special_tokens=False)
    ids = []
    for digit in ("1", "0"):
        full = tokenizer.encode(f"{prefix_text} {digit}", add_special_tokens=False)
        k = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
        if k >= len(full):
            raise ValueError(f"tokenizer cannot write the answer digit {digit!r} after {prefix_text!r}")
        ids.append(full[k])
    if ids[0] == ids[1] or tokenizer.unk_token_id in ids:
        raise ValueError("tokenizer does not distinguish the answers '1' and '0'")
    return ids[0], ids[1]
