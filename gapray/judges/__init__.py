"""External judges: models other than the policy that give verdicts on its images.

The self-judging core (gapray/selfjudge.py) takes one as an object (`ExternalJudge`) and never imports a judge
itself; `build_judge(cfg)` is the one place a run's judge is made from its config (judge.kind, or gate.judge):
  oracle  the shapes world's pixel oracle (gapray/judges/oracle.py), for prompts with world metadata;
  vlm     any transformers image-text-to-text model (gapray/judges/vlm.py), for every prompt;
  none    no external judge.
Its verdicts are the ledger's `oracle_verdict` column (the name is historical), with `judge_model` and `judge_p`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gapray.judges.vlm import JUDGE_MODES, JudgeOutput, VLMExternalJudge, VLMJudge

__all__ = ["JUDGE_MODES", "ExternalJudge", "JudgeOutput", "VLMExternalJudge", "VLMJudge", "build_judge",
           "load_vlm_judge"]


class ExternalJudge(Protocol):
    name: str  # what the ledger's judge_model column records: "oracle" or the VLM's id / path

    def covers(self, prompt) -> bool:
        """Whether it can judge this prompt (callers decode and ship pixels only for those)."""

    def __call__(self, images, prompts: list) -> list[tuple[int | None, float | None]]:
        """(verdict, p) per (image, prompt), batched: 1 aligned, 0 not, None where it cannot judge or did not parse."""


def build_judge(cfg) -> ExternalJudge | None:
    """The run's external judge from its config (gapray.config.judge_kind says which); None for `none`.
    A VLM that does not load is a UserError naming judge.model."""
    from gapray.config import judge_kind

    kind = judge_kind(cfg)
    if kind == "none":
        return None
    if kind == "oracle":
        from gapray.judges.oracle import OracleJudge  # the one place outside the world that imports it
        return OracleJudge()
    return VLMExternalJudge(load_vlm_judge(cfg.judge), mode=cfg.judge.mode)


def load_vlm_judge(j) -> VLMJudge:
    """judge.model from the local cache or a directory first (no network round-trips), then the hub."""
    from gapray.errors import UserError

    kw = dict(dtype=j.dtype, device=j.device, device_map=j.get("device_map"), batch_size=j.batch_size,
              threshold=j.threshold, max_new_tokens=j.max_new_tokens)
    try:
        return VLMJudge.from_pretrained(j.model, local_files_only=True, **kw)
    except ValueError as e:  # found, but no image-text-to-text model (a text-only LM, a diffusion pipeline...)
        raise UserError(f"judge.model: '{j.model}' does not load as an image-text-to-text model "
                        f"(AutoModelForImageTextToText): {str(e).splitlines()[0][:160]}") from None
    except OSError as e:
        if Path(j.model).exists():
            raise UserError(f"judge.model: could not load '{j.model}': {str(e).splitlines()[0][:200]}") from None
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    try:
        return VLMJudge.from_pretrained(j.model, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"judge.model: could not load '{j.model}' from the hub or its local cache (is the hub "
                        f"reachable, the id right, an image-text-to-text model?): {str(e).splitlines()[0][:160]}") from None
