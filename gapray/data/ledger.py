"""The verdict ledger: every verdict of every round, as Parquet, keyed by (round, prompt_id, sample_idx).

Layout: `<run_dir>/ledger/round=R/part-<key hash>.parquet` (LEDGER_SCHEMA), a Hive-style partition that
pyarrow and Ray Data read as one table. Guarantees, per round:
  - nothing twice: a part file is named by the hash of the keys it holds and written atomically
    (temporary name, then rename), so a retried write of the same batch lands on the same file, and
    `write` drops rows whose keys the round already holds;
  - nothing lost: a part is complete or absent, and `missing` tells a re-run exactly which
    (prompt, sample_idx) still need an image, so an interrupted round resumes where it stopped and a
    finished one does no work at all.
Integrity (gapray/data/integrity.py): every part has a manifest entry (rows, bytes, schema) written with it,
and every read checks each part's footer and entry first: a damaged or foreign part is a UserError naming it.
Moved aside, its keys are missing, so the phase that fills the round draws them again, with the same seeds.
Assumes one writer per round at a time (the round's driver); parts may be written by many processes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from gapray.data.integrity import check_parquet, publish
from gapray.data.schemas import LEDGER_SCHEMA
from gapray.prompts import Prompt


class VerdictLedger:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def round_dir(self, round: int) -> Path:
        return self.root / f"round={int(round)}"

    def rounds(self) -> list[int]:
        found = (int(d.name.split("=", 1)[1]) for d in self.root.glob("round=*"))
        return sorted(r for r in found if self.parts(r))

    def parts(self, round: int) -> list[Path]:
        """Complete part files of a round, in name order (temporary files start with '.')."""
        d = self.round_dir(round)
        return sorted(d.glob("part-*.parquet")) if d.is_dir() else []

    def intact_parts(self, round: int) -> list[Path]:
        """`parts`, each checked (footer, schema, manifest entry; no data read): a damaged one is a UserError."""
        parts = self.parts(round)
        for p in parts:
            check_parquet(p, f"move it aside (mv {p} {p}.damaged) and submit again: a phase not yet complete draws "
                             f"its rows again with the same seeds (`gapray verify RUN_DIR` says which)")
        return parts

    # ---- reading ----------------------------------------------------------------------------------------
    def dataset(self, round: int) -> pads.Dataset:
        return pads.dataset([str(p) for p in self.intact_parts(round)], schema=LEDGER_SCHEMA, format="parquet")

    def read(self, round: int, columns: list[str] | None = None) -> pa.Table:
        """A round's rows (all columns, or `columns`): for small rounds, tests and audits."""
        if not self.parts(round):
            return LEDGER_SCHEMA.empty_table().select(columns or LEDGER_SCHEMA.names)
        return self.dataset(round).to_table(columns=columns)

    def iter_batches(self, round: int, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Stream a round without holding it: one record batch at a time."""
        if self.parts(round):
            yield from self.dataset(round).to_batches(columns=columns, batch_size=batch_size)

    def count(self, round: int) -> int:
        """Rows stored for a round, duplicates included (from the Parquet footers: no data is read)."""
        return sum(pq.read_metadata(p).num_rows for p in self.intact_parts(round))

    def keys(self, round: int) -> set[tuple[str, int]]:
        t = self.read(round, ["prompt_id", "sample_idx"])
        return set(zip(t.column("prompt_id").to_pylist(), t.column("sample_idx").to_pylist()))

    def missing(self, round: int, prompts: Iterable[Prompt], k: int) -> list[tuple[Prompt, list[int]]]:
        """(prompt, sample indices without a verdict yet) for every prompt with work left, in prompt order."""
        have = self.keys(round)
        todo = []
        for p in prompts:
            idx = [j for j in range(k) if (p.prompt_id, j) not in have]
            if idx:
                todo.append((p, idx))
        return todo

    # ---- writing ----------------------------------------------------------------------------------------
    def write_part(self, round: int, table: pa.Table) -> Path | None:
        """Store one batch of a round's verdict rows as one part; returns its path (None if it was empty).

        The caller guarantees the keys are new to the round (the pipeline only draws missing keys); a part
        with exactly these keys already there means this batch was written before, and it is kept as is.
        """
        if table.num_rows == 0:
            return None
        table = table.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)
        rounds = set(table.column("round").to_pylist())
        if rounds != {int(round)}:
            raise ValueError(f"rows of rounds {sorted(rounds)} written to round {round}")
        keys = sorted(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
        if len(set(keys)) != len(keys):
            raise ValueError(f"a ledger batch repeats a key, e.g. {next(k for k in keys if keys.count(k) > 1)}")
        digest = hashlib.blake2b("\n".join(f"{p}\t{j}" for p, j in keys).encode(), digest_size=10).hexdigest()
        path = self.round_dir(round) / f"part-{digest}.parquet"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        publish(tmp, path)  # its manifest entry, then the part, atomically: readers see all of it or none
        return path

    def write(self, round: int, rows: list[dict] | pa.Table) -> int:
        """Add verdict rows to a round, skipping every key it already holds; returns the rows added."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
        have = self.keys(round)
        keep, seen = [], set()
        for i, key in enumerate(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist())):
            if key not in have and key not in seen:
                keep.append(i)
                seen.add(key)
        self.write_part(round, table.take(pa.array(keep, pa.int64())))
        return len(keep)
