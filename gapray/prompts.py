"""Prompt sets: GenEval's metadata JSONL and plain-text lists (T2I-CompBench style).

GenEval JSONL: one object a line with `prompt`, `tag` (the task), `include` (a list of objects, each
with `class` and `count`, optionally `color` and `position`), optional `exclude`; gapray adds an optional
stable `prompt_id`. Plain text: one prompt a line; blank lines and lines starting with '#' are skipped;
the task is the file's stem unless `task=` overrides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gapray.errors import UserError

RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    task: str
    prompt: str
    meta: dict | None = field(default=None, compare=False)  # GenEval metadata (include/exclude), if any


def load_prompts(path: str | Path, task: str | None = None, limit: int | None = None) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts: file '{path}' not found (give a GenEval .jsonl or a plain-text .txt file)")
    if path.suffix == ".jsonl":
        rows = _load_geneval(path)
    elif path.suffix == ".txt":
        rows = _load_text(path, task or path.stem)
    else:
        raise UserError(f"prompts: '{path}' must end in .jsonl (GenEval metadata) or .txt (one prompt a line)")
    if not rows:
        raise UserError(f"prompts: '{path}' holds no prompts")
    ids = [r.prompt_id for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"prompts: '{path}' repeats prompt_id '{dup}'; ids must be unique")
    return rows[:limit] if limit else rows


def _load_text(path: Path, task: str) -> list[Prompt]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            rows.append(Prompt(prompt_id=f"{path.stem}-{n:05d}", task=task, prompt=text))
    return rows


def _load_geneval(path: Path) -> list[Prompt]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"prompts: {where}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"prompts: {where}: expected a JSON object with 'prompt', 'tag' and 'include'")
        _check_geneval(obj, where)
        meta = {k: obj[k] for k in ("tag", "include", "exclude") if k in obj}
        rows.append(Prompt(prompt_id=str(obj.get("prompt_id", f"{path.stem}-{n:05d}")), task=obj["tag"],
                           prompt=obj["prompt"], meta=meta))
    return rows


def _check_geneval(obj: dict, where: str) -> None:
    for key in ("prompt", "tag"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise UserError(f"prompts: {where}: '{key}' must be a non-empty string")
    if not isinstance(obj.get("include"), list) or not obj["include"]:
        raise UserError(f"prompts: {where}: 'include' must be a non-empty list of objects")
    for key in ("include", "exclude"):
        for i, item in enumerate(obj.get(key, [])):
            at = f"{where}: {key}[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("class"), str):
                raise UserError(f"prompts: {at} needs a 'class' string")
            if not isinstance(item.get("count", 1), int) or item.get("count", 1) < 1:
                raise UserError(f"prompts: {at}: 'count' must be an integer >= 1")
            if "color" in item and not isinstance(item["color"], str):
                raise UserError(f"prompts: {at}: 'color' must be a string")
            pos = item.get("position")
            if pos is not None and not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                                        and isinstance(pos[1], int) and 0 <= pos[1] < len(obj["include"])):
                raise UserError(f"prompts: {at}: 'position' must be [relation, index] with relation one of "
                                f"{list(RELATIONS)} and index into include")
