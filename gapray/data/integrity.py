"""Integrity of a run directory: every Parquet file and checkpoint gapray wrote is checked before it is trusted.

Parquet. A file gets a manifest entry when it is written, `<dir>/_manifest/<name>.json` (rows, byte size,
schema fingerprint), put in place just before the file itself (`publish`). The file is intact when its footer
reads, its schema is the one its name says (a ledger part: LEDGER_SCHEMA; sft/dpo/discard.parquet;
verdicts.parquet), or an earlier version of it that older run directories hold (schemas.EARLIER_SCHEMAS: a
ledger from before the judge_model/judge_p columns), and rows, bytes and schema are those of its entry. Only footers are read, never data. One
entry per file rather than one manifest per directory: ledger parts are written by many processes at once, on
shared storage where appends to one file are not atomic. The `_` prefix keeps pyarrow's and Ray Data's
directory discovery away from the entries. Files written before manifests existed: footer and schema.

Checkpoints and the rest: a safetensors file's header parses and the file holds every tensor it lists; a
torch file (.pt, .bin: a zip archive) has its central directory, at the end, which truncation loses; JSON,
JSONL and YAML files parse. Cheap checks of what a cut-short write or a foreign file breaks; no checksums.

A run directory (its layout: gapray/rundir.py): every file belongs to the phase that writes it, and the
fix a problem names depends on whether state.json lists that phase as complete. A phase not yet complete
writes the file again when the run is submitted again (a ledger part: the same rows, drawn with the same
seeds); a complete one does not. A manifest entry whose file is gone is a problem only in a complete phase.
No Ray, no torch: `gapray verify RUN_DIR` is quick.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from gapray.data.schemas import DISCARD_SCHEMA, DPO_SCHEMA, EARLIER_SCHEMAS, LEDGER_SCHEMA, SFT_SCHEMA, VERDICT_SCHEMA
from gapray.errors import UserError
from gapray.rundir import LEDGER_PHASES, phase_of

MANIFEST = "_manifest"
SCHEMAS = {"sft.parquet": ("SFT_SCHEMA", SFT_SCHEMA), "dpo.parquet": ("DPO_SCHEMA", DPO_SCHEMA),
           "discard.parquet": ("DISCARD_SCHEMA", DISCARD_SCHEMA), "verdicts.parquet": ("VERDICT_SCHEMA", VERDICT_SCHEMA)}


# ---- Parquet: manifest entries and footers ------------------------------------------------------------------
def fingerprint(schema: pa.Schema) -> str:
    return hashlib.sha256(str(schema.remove_metadata()).encode()).hexdigest()[:16]


def manifest_entry(path: Path) -> Path:
    return path.parent / MANIFEST / f"{path.name}.json"


def publish(tmp: Path, path: Path) -> None:
    """Put a finished temporary Parquet file in place at `path` (atomically), its manifest entry first."""
    meta = pq.read_metadata(tmp)
    entry = manifest_entry(path)
    entry.parent.mkdir(exist_ok=True)
    entry_tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    entry_tmp.write_text(json.dumps({"rows": meta.num_rows, "bytes": tmp.stat().st_size,
                                     "schema": fingerprint(meta.schema.to_arrow_schema())}))
    os.replace(entry_tmp, entry)
    os.replace(tmp, path)  # readers see the whole file or none of it


def expected_schema(path: Path) -> tuple[str, pa.Schema] | None:
    if path.name.startswith("part-") and path.parent.name.startswith("round="):
        return "LEDGER_SCHEMA", LEDGER_SCHEMA
    return SCHEMAS.get(path.name)


def parquet_problem(path: Path) -> str | None:
    """What is wrong with a Parquet file gapray wrote (None: nothing), from its footer and manifest entry."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        return f"not a readable Parquet file ({_first_line(e)})"
    schema = meta.schema.to_arrow_schema().remove_metadata()
    want = expected_schema(path)
    if want and not any(schema.equals(s) for s in [want[1], *EARLIER_SCHEMAS.get(want[0], [])]):
        return f"holds another schema than {want[0]} ({_schema_diff(schema, want[1])}): a foreign file?"
    entry_path = manifest_entry(path)
    if not entry_path.is_file():
        return None  # written before manifests existed
    try:
        entry = json.loads(entry_path.read_text())
        rows, size, fp = entry["rows"], entry["bytes"], entry["schema"]
    except (ValueError, KeyError, TypeError):
        return f"its manifest entry {entry_path} does not read"
    if fp != fingerprint(schema):
        return "holds another schema than when it was written"
    if meta.num_rows != rows:
        return f"holds {meta.num_rows} rows, {rows} when it was written"
    if path.stat().st_size != size:
        return f"is {path.stat().st_size} bytes, {size} when it was written"
    return None


def check_parquet(path: Path, fix: str) -> None:
    """A UserError naming `path`, what is wrong and `fix`, unless the file is intact."""
    problem = parquet_problem(path)
    if problem:
        raise UserError(f"{path}: {problem}; {fix}")


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """pq.read_table of a file a run wrote, checked first (a damaged file: one line, not a traceback)."""
    check_parquet(Path(path), "`gapray verify RUN_DIR` names the fix")
    return pq.read_table(path, columns=columns)


def _schema_diff(have: pa.Schema, want: pa.Schema) -> str:
    missing = [n for n in want.names if n not in have.names]
    extra = [n for n in have.names if n not in want.names]
    kind = lambda f: f"{f.type}{'' if f.nullable else ' not null'}"  # noqa: E731
    changed = [f"{f.name} is {kind(f)}, not {kind(want.field(f.name))}" for f in have
               if f.name in want.names and f != want.field(f.name)]
    out = [f"lacks {', '.join(missing)}" if missing else "", f"has {', '.join(extra)}" if extra else "",
           "; ".join(changed[:3])]
    return "; ".join(s for s in out if s) or "other column order"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---- checkpoints and the rest ---------------------------------------------------------------------------
def safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            return f"truncated: {size} bytes, its header alone says {n + 8}"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "not a safetensors file (its header does not parse)"
    if size < 8 + n + end:
        return f"truncated: {size} bytes, its header lists tensors up to byte {8 + n + end}"
    if size > 8 + n + end:
        return f"{size - 8 - n - end} bytes past its last tensor"
    return None


def torch_problem(path: Path) -> str | None:
    """torch.save writes a zip archive; its central directory is at the end of the file."""
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a whole torch file ({e})"
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, OSError) as e:
        return f"not valid JSON ({e})"
    return None


def jsonl_problem(path: Path) -> str | None:
    try:
        lines = path.read_text().splitlines()
    except (ValueError, OSError) as e:
        return f"does not read ({e})"
    for i, line in enumerate(lines, 1):
        try:
            if line:
                json.loads(line)
        except ValueError:
            return f"line {i} is not JSON"
    return None


def yaml_problem(path: Path) -> str | None:
    try:
        if not isinstance(yaml.safe_load(path.read_text()), dict):
            return "not a YAML mapping"
    except (yaml.YAMLError, ValueError, OSError) as e:
        return f"not valid YAML ({_first_line(e)})"
    return None


CHECKS = {".parquet": ("Parquet", parquet_problem), ".safetensors": ("safetensors", safetensors_problem),
          ".pt": ("torch", torch_problem), ".bin": ("torch", torch_problem), ".json": ("JSON", json_problem),
          ".jsonl": ("JSON", jsonl_problem), ".yaml": ("YAML", yaml_problem)}


# ---- a run directory -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Problem:
    path: Path
    what: str
    fix: str
    fatal: bool = True  # False: expected after an interruption and handled on resume (reported, not refused)

    def __str__(self) -> str:
        return f"{'' if self.fatal else 'note: '}{self.path}: {self.what}; {self.fix}"


def interrupted_checkpoint(rel: Path, completed: set[str] | None) -> bool:
    """A file of a Ray Train checkpoint of a training phase not yet complete: a run killed while the checkpoint
    was being written leaves it partial, and Ray Train resumes from the last checkpoint it registered."""
    phase = phase_of(rel)
    return (phase is not None and phase.startswith("train/") and phase not in (completed or set())
            and len(rel.parts) > 4 and rel.parts[3] == "checkpoints" and rel.parts[4].startswith("checkpoint_"))


def fix_for(run_dir: Path, rel: Path, completed: set[str] | None) -> str:
    path, phase = run_dir / rel, phase_of(rel)
    aside = f"move it aside (mv {path} {path}.damaged)"
    if phase is None or completed is None:
        return "restore it from a copy, or start the run again in a new run_dir"
    if phase in completed:
        if phase.startswith("train/") and len(rel.parts) > 4 and rel.parts[3] == "checkpoints":
            return f"{phase} is complete and reads its resume checkpoints no more: {aside}"
        return (f"{phase} is complete, so submitting again does not write it again: restore it from a copy, "
                f"or start the run again in a new run_dir")
    if phase.startswith("train/"):
        d = run_dir.joinpath(*rel.parts[:3])
        return f"move {d} aside (mv {d} {d}.damaged) and submit again: {phase}, not yet complete, trains from its start"
    if rel.parts[0] in LEDGER_PHASES:
        return f"{aside} and submit again: {phase}, not yet complete, draws its rows again with the same seeds"
    return f"{aside} and submit again: {phase}, not yet complete, writes it again"


def verify_run_dir(run_dir: str | Path) -> tuple[list[Problem], Counter]:
    """Every file gapray reads back, checked (no data read): the problems, and the files verified by kind."""
    run_dir = Path(run_dir)
    completed = _completed(run_dir)
    problems, kinds = [], Counter()
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if any(p.startswith(".") for p in rel.parts):  # temporaries; Ray Train's own markers
            continue
        if path.parent.name == MANIFEST:  # an entry whose file is gone: moved aside, or lost
            target = path.parent.parent / path.name.removesuffix(".json")
            if not target.exists() and completed and phase_of(rel) in completed:
                rel = target.relative_to(run_dir)
                problems.append(Problem(target, "is missing (its manifest entry says it was written)",
                                        fix_for(run_dir, rel, completed)))
            continue
        kind, check = CHECKS.get(path.suffix, (None, None))
        if check is None or not path.is_file():
            continue
        kinds[kind] += 1
        what = check(path)
        if what and interrupted_checkpoint(rel, completed):
            problems.append(Problem(path, what, "an interrupted checkpoint write: training resumes from the last "
                                    "complete checkpoint, nothing to do", fatal=False))
        elif what:
            problems.append(Problem(path, what, fix_for(run_dir, rel, completed)))
    return problems, kinds


def format_report(run_dir: Path, problems: list[Problem], kinds: Counter) -> list[str]:
    """One line per problem, or one line saying the run directory is intact (then any notes)."""
    if any(p.fatal for p in problems):
        return [str(p) for p in problems]
    files = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return [f"{run_dir}: intact ({sum(kinds.values())} files verified: {files})"] + [str(p) for p in problems]


def check_run_dir_integrity(run_dir: Path) -> None:
    """Before any phase runs (jobs/self_improve.py): a damaged or foreign file is a UserError naming it and the
    fix; an intact run directory says so in one line. A run directory not made yet: nothing to do."""
    if not run_dir.is_dir():
        return
    problems, kinds = verify_run_dir(run_dir)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        more = f" (and {len(fatal) - 1} more: `gapray verify {run_dir}` lists them)" if len(fatal) > 1 else ""
        raise UserError(f"{fatal[0]}{more}")
    if kinds:
        for line in format_report(run_dir, problems, kinds):
            print(f"[gapray] {line}", flush=True)


def _completed(run_dir: Path) -> set[str] | None:
    try:
        return set(json.loads((run_dir / "state.json").read_text())["completed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no state (not a self-improvement run), or a damaged one (reported as a JSON problem)
