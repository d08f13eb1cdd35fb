"""The Ray Data pipeline's task code (gapray/backends/ray.py): it runs in Ray Data's worker processes, so it
imports little (no torch, no transformers: a worker that imported gapray.backends.ray would spend seconds of CPU
on imports, taken from the replicas on a small machine). One trip per image: a block of prompt rows becomes
self_judge calls to the ModelServer replicas, whose answers (ledger-ready verdict rows) are stored here.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import ray
from ray import serve

from gapray.data.ledger import VerdictLedger
from gapray.data.schemas import LEDGER_SCHEMA
from gapray.serve.replica import DEPLOYMENT, quiet_serve_logs

log = logging.getLogger(__name__)
# A request lost with its replica is safe to send again: images depend on their seeds only.
RETRIABLE = (ray.exceptions.RayActorError, serve.exceptions.BackPressureError,
             serve.exceptions.ReplicaUnavailableError, serve.exceptions.DeploymentUnavailableError)


COUNTED = ["prompt_id", "sample_idx", "verdict", "policy_version"]  # what run_round's driver sees of a verdict


def call_all(method, calls: list[tuple], retries: int) -> list:
    """`method.remote(*args)` for every args tuple at once (so that Serve can batch them), then the answers
    in order; a call that fails because its replica went away is sent again, up to `retries` times."""
    responses = [method.remote(*args) for args in calls]
    answers = []
    for args, response in zip(calls, responses):
        for attempt in range(retries + 1):
            try:
                answers.append(response.result())
                break
            except RETRIABLE as e:
                if attempt == retries:
                    raise
                log.warning("request lost with its replica (%s); sending it again (%d/%d)",
                            type(e).__name__, attempt + 1, retries)
                time.sleep(min(0.25 * 2 ** attempt, 4.0))  # give Serve time to start a replacement
                response = method.remote(*args)
    return answers


_handles: dict[str, object] = {}  # app name -> DeploymentHandle, per worker process (Ray reuses the workers)


def _handle(app_name: str, log_level: str):
    if app_name not in _handles:
        quiet_serve_logs(log_level)
        _handles[app_name] = serve.get_deployment_handle(DEPLOYMENT, app_name)
    return _handles[app_name]


def _prompt(row: dict) -> dict:
    return {"prompt_id": row["prompt_id"], "task": row["task"], "prompt": row["prompt"],
            "meta": json.loads(row["meta"]) if row["meta"] else None}


def _store(rows: list[dict], round: int, ledger_root: str | None) -> pa.Table:
    """Verdict rows as a ledger part: written here (no extra stage, no extra worker processes) when there is a
    ledger, and then only what the driver counts passed on."""
    table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
    if ledger_root is None:
        return table
    VerdictLedger(ledger_root).write_part(round, table)
    return table.select(COUNTED)


def self_judge_block(batch: pa.Table, *, app_name: str, sampling: dict, seed: int, mode: str, threshold: float,
                     round: int, retries: int, ledger_root: str | None = None,
                     log_level: str = "WARNING") -> pa.Table:
    """Prompt rows -> verdict rows (LEDGER_SCHEMA), one trip per image: a ModelServer replica draws, decodes and
    judges each image (itself, and the external judge it was deployed with) and answers ledger-ready rows, each
    with its policy_version. One call per prompt: the replica cuts it into its own batches."""
    calls = [(_prompt(row), row["sample_idx"], seed, sampling, mode, threshold) for row in batch.to_pylist()]
    answers = call_all(_handle(app_name, log_level).self_judge, calls, retries)
    return _store([{"round": round, **r} for a in answers for r in a["rows"]], round, ledger_root)


def rescore_block(batch: pa.Table, *, app_name: str, mode: str, threshold: float, round: int, retries: int,
                  ledger_root: str | None = None, log_level: str = "WARNING") -> pa.Table:
    """Images drawn earlier (RESCORE_ROW_SCHEMA) -> the serving policy's verdict rows, keyed as the originals."""
    by_prompt: dict[str, list[dict]] = {}
    for row in batch.to_pylist():
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    calls = [(_prompt(g[0]), [r["sample_idx"] for r in g], [r["seed"] for r in g],
              np.array([r["image_tokens"] for r in g], dtype=np.int64),
              np.array([r["logprob"] for r in g], dtype=np.float32), mode, threshold) for g in by_prompt.values()]
    answers = call_all(_handle(app_name, log_level).rescore, calls, retries)
    return _store([{"round": round, **r} for a in answers for r in a["rows"]], round, ledger_root)
