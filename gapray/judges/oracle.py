"""The shapes world's pixel oracle as an external judge: GenEval's rules on the world's own renderer.

It judges only prompts whose GenEval metadata speaks of the world's shapes and colours (`covers`); other
prompts get no external verdict. Deterministic and cheap: no confidence (judge_p null)."""

from __future__ import annotations

from gapray.prompts import Prompt
from gapray.world import in_world, judge


class OracleJudge:
    name = "oracle"  # the ledger's judge_model

    def covers(self, prompt: Prompt) -> bool:
        return in_world(prompt.meta)

    def __call__(self, images, prompts: list[Prompt]) -> list[tuple[int | None, float | None]]:
        return [(int(judge(im, p.meta)), None) if self.covers(p) else (None, None) for im, p in zip(images, prompts)]
