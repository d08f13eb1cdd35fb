"""The run directory of jobs/self_improve.py: every path named once, and the phase that writes each file.

    <run_dir>/
      config.yaml  state.json                  the run's config; completed phases (gapray/curriculum.py RunState)
      ledger/round=R/part-*.parquet            sample/R: the round's verdicts (gapray.data.ledger.VerdictLedger)
      data/round=R/{sft,dpo,discard}.parquet   sample/R: the round's preference data (gapray.data.preference)
      data/round=R/replay/, with_replay/       replay/R: the replayed discard pool's data; the round's data + it
      replay/round=R/part-*.parquet            replay/R: the replay's verdicts
      checkpoints/round=R/{a,b}/               train/R/a, train/R/b: a training run's run_dir (model/, checkpoints/)
      eval/ledger/round=I/, composition/ledger/round=I/   measure/I: held-out verdicts (and the composition split's)
      eval/rescore/round=I/                    measure/I: the base model's eval images judged by policy I
      summary.json  report.md  plots/  grids/  report: what the run found
No I/O here and no imports beyond the standard library: gapray.data.integrity reads the same layout to tell
which phase a damaged file belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# the top-level ledger directories and the phase that fills each
LEDGER_PHASES = {"ledger": "sample", "replay": "replay", "eval": "measure", "composition": "measure"}


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def grids(self) -> Path:
        return self.root / "grids"

    @property
    def ledger(self) -> Path:
        """The sample rounds' verdicts."""
        return self.root / "ledger"

    @property
    def replay_ledger(self) -> Path:
        return self.root / "replay"

    def eval_ledger(self, split: str = "eval") -> Path:
        """Held-out verdicts: split "eval", or "composition" (reported apart)."""
        return self.root / split / "ledger"

    @property
    def rescore_ledger(self) -> Path:
        """measure/I, I >= 1: the base model's eval images judged again by the current policy (the win rate)."""
        return self.root / "eval" / "rescore"

    def data(self, r: int) -> Path:
        return self.root / "data" / f"round={r}"

    def replay_data(self, r: int) -> Path:
        return self.data(r) / "replay"

    def with_replay(self, r: int) -> Path:
        return self.data(r) / "with_replay"

    def train(self, r: int, part: str) -> Path:
        """train/r/part's training run directory (gapray.train.run_training's run_dir)."""
        return self.root / "checkpoints" / f"round={r}" / part


def phase_of(rel: Path) -> str | None:
    """The phase of gapray/curriculum.py that writes a file of the run directory (rel: its path inside it);
    None: no phase (config.yaml, state.json, the report's pictures)."""
    parts = rel.parts
    r = next((p.split("=", 1)[1] for p in parts if re.fullmatch(r"round=\d+", p)), None)
    if parts[0] == "summary.json":
        return "report"
    if r is None:
        return None
    if parts[0] in LEDGER_PHASES:
        return f"{LEDGER_PHASES[parts[0]]}/{r}"
    if parts[0] == "data":
        return f"replay/{r}" if {"replay", "with_replay"} & set(parts[2:-1]) else f"sample/{r}"
    if parts[0] == "checkpoints" and len(parts) > 3 and parts[2] in ("a", "b"):
        return f"train/{r}/{parts[2]}"
    return None
