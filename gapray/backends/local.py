"""backend=local: one process, the model in memory, the same phases and the same ledger rows as backend=ray."""

from __future__ import annotations

import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gapray.data.ledger import VerdictLedger
from gapray.data.schemas import LEDGER_SCHEMA
from gapray.judges import build_judge
from gapray.models import SampleOutput, SamplingParams
from gapray.models.base import local_reference
from gapray.models.loading import load_model, swap_weights
from gapray.plan import memory_batch_rows
from gapray.prompts import Prompt
from gapray.selfjudge import judge_samples, sample_and_score_images


class LocalBackend:
    """One process: the model in memory samples and judges; training runs as train.backend says."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.model = load_model(cfg.model)
        self.judge = build_judge(cfg)  # the external judge, loaded once beside the policy (None: judge.kind=none)
        self.checkpoint: str | None = None
        self.policy_version = 0

    def serve(self, checkpoint: str | None, policy_version: int) -> None:
        if checkpoint != self.checkpoint:
            swap_weights(self.model, OmegaConf.to_container(self.cfg.model), checkpoint)
            self.checkpoint = checkpoint
        self.policy_version = policy_version

    def fill(self, prompts: list[Prompt], ledger: VerdictLedger, round: int, k: int, seed: int, desc: str) -> int:
        todo = ledger.missing(round, prompts, k)
        sampling = SamplingParams(**OmegaConf.to_container(self.cfg.sampling))
        added = 0
        with tqdm(total=sum(len(i) for _, i in todo), unit="img", desc=desc, dynamic_ncols=True, mininterval=5) as bar:
            for start in range(0, len(todo), self.cfg.batch_prompts):
                chunk = todo[start:start + self.cfg.batch_prompts]
                rows = sample_and_score_images(self.model, chunk, sampling, seed, self.cfg.scoring.mode,
                                               self.cfg.scoring.threshold, self.judge)
                added += self._write(ledger, round, rows)
                bar.update(len(rows))
        return added

    def rescore(self, rows: pa.Table, prompts: list[Prompt], ledger: VerdictLedger, round: int) -> int:
        by_id = {p.prompt_id: p for p in prompts}
        have = ledger.keys(round)
        todo = [r for r in rows.to_pylist() if (r["prompt_id"], r["sample_idx"]) not in have]
        added = 0
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            flat = [by_id[r["prompt_id"]] for r in chunk]
            out = SampleOutput(tokens=_tokens(chunk), logprobs=_logprobs(chunk), seeds=[r["seed"] for r in chunk])
            # the policy's verdicts only: the win rate reads the external verdicts of the original rows
            added += self._write(ledger, round, judge_samples(self.model, flat, [r["sample_idx"] for r in chunk], out,
                                                              self.cfg.scoring.mode, self.cfg.scoring.threshold))
        return added

    def decode(self, tokens):
        return self.model.decode(tokens)

    def reencode(self, tokens: list[list[int]]) -> list[list[int]]:
        return self.model.reencode(torch.tensor(tokens)).tolist()

    def reference(self):
        return local_reference(self.model, batch_size=self.cfg.serve.max_batch_size or memory_batch_rows(self.model))

    def _write(self, ledger: VerdictLedger, round: int, rows: list[dict]) -> int:
        ledger.write_part(round, pa.Table.from_pylist(
            [{"round": round, **r, "policy_version": self.policy_version} for r in rows], schema=LEDGER_SCHEMA))
        return len(rows)


def _tokens(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r["image_tokens"] for r in rows])


def _logprobs(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([[r["logprob"]] for r in rows])  # the summed log-prob, as one "token"
