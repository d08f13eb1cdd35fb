"""Ray Serve: `ModelServer` replicas hold one UnifiedModel each and sample and self-score images for everyone.

What it supports
  - `sample(prompt, seeds, sampling)`: one image per seed (our CFG sampler; an image depends on model,
    prompt and seed only, so dynamic batching never changes an image);
  - `score(prompt, image_tokens, mode)`: decode the images and ask the verdict question;
  - `self_judge(prompt, sample_idx, seed, sampling, mode, threshold)`: one trip per image for the Ray pipeline
    (gapray/backends/ray.py): sample, decode, self-judge and external judge (built in the replica from the
    judge spec it was deployed with: the oracle runs here, a VLM in its JudgeServer app, gapray/serve/judge.py),
    answered as ledger-ready verdict rows (gapray.selfjudge.sample_and_score_images); pixels never leave;
  - `rescore(prompt, sample_idx, seeds, image_tokens, logprobs, mode, threshold)`: images drawn earlier judged
    again by the serving policy (gapray.selfjudge.judge_samples), as verdict rows;
  - `logprobs(prompts, image_tokens)`: conditional log-prob sums (reference log-probs for DPO);
  - `decode(image_tokens)` (pixels, for report grids) and `reencode(image_tokens)` (the decoded pictures'
    VQ tokens, for training data): so the driver needs no model of its own;
  - `@serve.batch` on every model call, with the batch size counted in model rows (a guided image is two
    rows: cond + uncond), so `max_batch_size` bounds memory whatever the request sizes;
  - weight reload in place through `reconfigure(user_config={"checkpoint": dir, "policy_version": v})`:
    Serve calls it on the live replicas without restarting them, and a replica that starts later (one
    that replaces a dead one, or an autoscaled one) gets the same user_config, so no replica serves an old
    policy; every answer carries the policy_version of the weights that produced it;
  - HTTP routes (FastAPI ingress) under the route prefix: POST /sample, POST /score, GET /version.

The work itself is plain functions (`sample_requests`, `score_requests`, `self_judge_requests`,
`rescore_requests`; `swap_weights` in gapray/models/loading.py) that run without
Ray; the deployment only adds batching, a lock (a batch never sees a half-swapped model) and metrics.

Standalone, on a machine where Ray must stay on loopback (conf/serve.yaml binds HTTP to 127.0.0.1):

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 serve run conf/serve.yaml
    curl -s -X POST http://127.0.0.1:8000/gapray/sample -H 'Content-Type: application/json' \\
         -d '{"prompt": "a photo of a red circle", "n": 2, "seed": 0}'
    curl -s -X POST http://127.0.0.1:8000/gapray/score -H 'Content-Type: application/json' \\
         -d '{"prompt": "a photo of a red circle", "image_tokens": [12, 40, ...]}'

A new policy, without restarting replicas: edit `user_config` in conf/serve.yaml and `serve deploy` it, or
from Python `reload(model, serve_cfg, checkpoint=dir, policy_version=v)`.
Assumes: a checkpoint is a save_pretrained directory of the same architecture as the served model (the
processor does not change); the served model fits on one replica's device.
"""

import asyncio
import base64
import collections
import dataclasses
import hashlib
import io
import json
import os
import socket
import time

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from omegaconf import OmegaConf
from pydantic import BaseModel, Field
from ray import serve

from gapray.config import ModelConfig, ServeAppConfig, load_config
from gapray.errors import UserError
from gapray.models import SampleOutput, SamplingParams, UnifiedModel
from gapray.models.base import local_reference
from gapray.models.loading import load_model, swap_weights
from gapray.models.sampler import image_seed
from gapray.plan import memory_batch_rows
from gapray.prompts import Prompt
from gapray.selfjudge import judge_samples, sample_and_score_images
from gapray.serve.judge import replica_judge
from gapray.serve.replica import (DEPLOYMENT, deployment_logging, hide_batch_bound_warning,
                                  keep_replica_grpc_on_loopback, plain_config, start_serve)
from gapray.verdict import to_verdict



# ---- the work, without Ray ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompt: str
    seeds: tuple[int, ...]  # one image per seed
    sampling: SamplingParams

    @property
    def rows(self) -> int:
        return len(self.seeds) * rows_per_image(self.sampling)

    def pieces(self) -> list["SampleRequest"]:
        return [dataclasses.replace(self, seeds=(s,)) for s in self.seeds]


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    prompt: str
    tokens: np.ndarray  # (n, T) image token ids, all judged against `prompt`
    mode: str = "logits"

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def pieces(self) -> list["ScoreRequest"]:
        return [dataclasses.replace(self, tokens=self.tokens[j:j + 1]) for j in range(len(self.tokens))]


@dataclasses.dataclass(frozen=True)
class SelfJudgeRequest:
    """Draw and judge images sample_idx of one prompt (image j's seed: image_seed(seed, prompt_id, j))."""
    prompt: Prompt
    sample_idx: tuple[int, ...]
    seed: int
    sampling: SamplingParams
    mode: str = "logits"
    threshold: float = 0.5

    @property
    def rows(self) -> int:
        return len(self.sample_idx) * rows_per_image(self.sampling)

    def pieces(self) -> list["SelfJudgeRequest"]:
        return [dataclasses.replace(self, sample_idx=(j,)) for j in self.sample_idx]


@dataclasses.dataclass(frozen=True)
class RescoreRequest:
    """Judge again images of one prompt drawn earlier (a ledger's rows: their tokens, seeds, summed log-probs)."""
    prompt: Prompt
    sample_idx: tuple[int, ...]
    seeds: tuple[int, ...]
    tokens: np.ndarray  # (n, T)
    logprobs: np.ndarray  # (n,) each image's summed log-prob, kept in the row as it was
    mode: str = "logits"
    threshold: float = 0.5

    @property
    def rows(self) -> int:
        return len(self.sample_idx)

    def pieces(self) -> list["RescoreRequest"]:
        return [dataclasses.replace(self, sample_idx=(j,), seeds=(x,), tokens=self.tokens[i:i + 1],
                                    logprobs=self.logprobs[i:i + 1])
                for i, (j, x) in enumerate(zip(self.sample_idx, self.seeds))]


def rows_per_image(sampling: SamplingParams) -> int:
    """Model rows one image costs while sampling: CFG runs a cond and an uncond row."""
    return 2 if sampling.guided else 1


def batch_rows(requests: list) -> int:
    """`@serve.batch`'s batch_size_fn: the model rows a batch of requests costs."""
    return sum(r.rows for r in requests)


def sample_requests(model: UnifiedModel, requests: list[SampleRequest]) -> list[dict]:
    """Answer sample requests with one `model.sample` call per distinct SamplingParams.

    Each image is one row with its own seed (n_per_prompt=1 over repeated prompts), so mixing prompts
    and requests in a batch changes nothing in any image.
    """
    answers: list[dict | None] = [None] * len(requests)
    groups: dict[SamplingParams, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.sampling].append(i)
    for sampling, idx in groups.items():
        prompts = [requests[i].prompt for i in idx for _ in requests[i].seeds]
        seeds = [s for i in idx for s in requests[i].seeds]
        out = model.sample(prompts, 1, sampling, seeds)
        start = 0
        for i in idx:
            n = len(requests[i].seeds)
            answers[i] = {"tokens": out.tokens[start:start + n].to(torch.int32).numpy(),
                          "logprobs": out.logprobs[start:start + n].float().numpy(),
                          "seeds": list(requests[i].seeds)}
            start += n
    return answers


def score_requests(model: UnifiedModel, requests: list[ScoreRequest]) -> list[dict]:
    """Decode and judge the images of score requests, one `model.score` call per score mode."""
    answers: list[dict | None] = [None] * len(requests)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.mode].append(i)
    for mode, idx in groups.items():
        tokens = torch.as_tensor(np.concatenate([np.asarray(requests[i].tokens) for i in idx]), dtype=torch.long)
        images = model.decode(tokens)
        prompts = [requests[i].prompt for i in idx for _ in range(requests[i].rows)]
        judged = model.score(prompts, images, mode=mode)
        start = 0
        for i in idx:
            n = requests[i].rows
            answers[i] = {"p_aligned": judged.p_aligned[start:start + n].tolist(),
                          "answers": list(judged.answers[start:start + n])}
            start += n
    return answers


def _split(rows: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(rows[start:start + n])
        start += n
    return out


def self_judge_requests(model: UnifiedModel, judge, requests: list[SelfJudgeRequest]) -> list[list[dict]]:
    """Verdict rows (VERDICT_SCHEMA) for each request: the self-judging core, one call per (sampling, mode,
    threshold, seed), with `judge` the replica's external judge (or None)."""
    answers: list[list[dict] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(requests):
        groups[(r.sampling, r.mode, r.threshold, r.seed)].append(i)
    for (sampling, mode, threshold, seed), idx in groups.items():
        rows = sample_and_score_images(model, [(requests[i].prompt, list(requests[i].sample_idx)) for i in idx],
                                       sampling, seed, mode, threshold, judge)
        for i, part in zip(idx, _split(rows, [len(requests[i].sample_idx) for i in idx])):
            answers[i] = part
    return answers


def rescore_requests(model: UnifiedModel, requests: list[RescoreRequest]) -> list[list[dict]]:
    """The serving policy's verdict rows for images drawn earlier; no external judge (the original rows have its
    verdicts)."""
    answers: list[list[dict] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(requests):
        groups[(r.mode, r.threshold)].append(i)
    for (mode, threshold), idx in groups.items():
        flat = [requests[i].prompt for i in idx for _ in requests[i].sample_idx]
        out = SampleOutput(tokens=torch.as_tensor(np.concatenate([requests[i].tokens for i in idx]), dtype=torch.long),
                           logprobs=torch.as_tensor(np.concatenate([requests[i].logprobs for i in idx]),
                                                    dtype=torch.float32)[:, None],  # the sum, as one "token"
                           seeds=[s for i in idx for s in requests[i].seeds])
        rows = judge_samples(model, flat, [j for i in idx for j in requests[i].sample_idx], out, mode, threshold)
        for i, part in zip(idx, _split(rows, [requests[i].rows for i in idx])):
            answers[i] = part
    return answers


def to_png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- the deployment -----------------------------------------------------------------------------------
class SampleBody(BaseModel):
    prompt: str
    n: int = Field(1, ge=1, le=256)
    seed: int = 0  # image j gets gapray.models.sampler.image_seed(seed, prompt_id, j), as in `gapray measure`
    prompt_id: str | None = None  # defaults to the prompt text
    guidance_scale: float = Field(5.0, gt=1.0)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    png: bool = False  # also return the images as base64 PNGs


class ScoreBody(BaseModel):
    prompt: str
    image_tokens: list[int]
    mode: str = "logits"
    threshold: float = Field(0.5, ge=0.0, le=1.0)


http_app = FastAPI(title="gapray ModelServer")


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(http_app)
class ModelServer:
    def __init__(self, model: dict, max_batch_size: int | None, batch_wait_timeout_s: float, judge: dict | None = None,
                 gpu_share: float = 1.0):
        from ray.util import metrics

        keep_replica_grpc_on_loopback()
        self.model_cfg = model
        self.model = load_model(OmegaConf.structured(ModelConfig(**model)))
        self.judge = replica_judge(judge)  # the external judge of self_judge (None: none)
        self.checkpoint: str | None = None  # None: the weights `model` names
        self.policy_version = 0
        # null: as many rows as this replica's device holds now that its weights are in (a GPU's free memory, within
        # its share of the card when replicas share one), so that one config fits an L4 and an H200 alike
        self.max_batch_size = max_batch_size or memory_batch_rows(self.model, gpu_share)
        self._lock = asyncio.Lock()  # one model call at a time; reconfigure waits for the running batch
        hide_batch_bound_warning()
        for handler in (self._sample_batch, self._score_batch, self._self_judge_batch, self._rescore_batch):
            handler.set_max_batch_size(self.max_batch_size)
            handler.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = {m: collections.deque(maxlen=4096) for m in ("sample", "score", "self_judge", "rescore")}
        self.model_seconds = dict.fromkeys(self.batches, 0.0)  # time in the model per method (benchmarks)
        self.m_images = metrics.Counter("gapray_images_sampled", "images drawn by ModelServer")
        self.m_scored = metrics.Counter("gapray_images_scored", "images judged by ModelServer")
        self.m_rows = metrics.Histogram("gapray_batch_rows", "model rows per batch",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("method",))
        self.m_version = metrics.Gauge("gapray_policy_version", "policy version a replica serves")

    async def reconfigure(self, user_config: dict) -> None:
        unknown = set(user_config) - {"checkpoint", "policy_version"}
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; valid: checkpoint, policy_version")
        checkpoint = user_config.get("checkpoint") or None
        async with self._lock:
            if checkpoint != self.checkpoint:
                await asyncio.to_thread(swap_weights, self.model, self.model_cfg, checkpoint)
                self.checkpoint = checkpoint
            self.policy_version = int(user_config.get("policy_version", 0))
            self.m_version.set(self.policy_version)

    # -- handle API (Ray Data calls these) --
    # A call of any size is cut into one piece per image (`pieces`), each queued for its @serve.batch handler:
    # batches fill exactly with the images of whatever calls are waiting, from any prompts, and no call is ever
    # larger than a batch, so callers need not know a replica's batch size (sized by memory, it differs by GPU).
    async def sample(self, prompt: str, seeds: list[int], sampling: dict | None = None) -> dict:
        parts = await self._pieces(self._sample_batch, SampleRequest(
            prompt, tuple(int(s) for s in seeds), SamplingParams(**(sampling or {}))))
        return {"tokens": np.concatenate([a["tokens"] for a in parts]),
                "logprobs": np.concatenate([a["logprobs"] for a in parts]),
                "seeds": [s for a in parts for s in a["seeds"]], "policy_version": min(a["policy_version"] for a in parts)}

    async def score(self, prompt: str, image_tokens, mode: str = "logits") -> dict:
        tokens = np.atleast_2d(np.asarray(image_tokens, dtype=np.int64))
        parts = await self._pieces(self._score_batch, ScoreRequest(prompt, tokens, mode))
        return {"p_aligned": [p for a in parts for p in a["p_aligned"]], "answers": [x for a in parts for x in a["answers"]],
                "policy_version": min(a["policy_version"] for a in parts)}

    async def self_judge(self, prompt: dict, sample_idx: list[int], seed: int, sampling: dict | None = None,
                         mode: str = "logits", threshold: float = 0.5) -> dict:
        """{"rows": verdict rows of images sample_idx, each with the policy_version that drew and judged it}."""
        return self._rows(await self._pieces(self._self_judge_batch, SelfJudgeRequest(
            Prompt(**prompt), tuple(int(j) for j in sample_idx), int(seed), SamplingParams(**(sampling or {})),
            mode, float(threshold))))

    async def rescore(self, prompt: dict, sample_idx: list[int], seeds: list[int], image_tokens, logprobs,
                      mode: str = "logits", threshold: float = 0.5) -> dict:
        return self._rows(await self._pieces(self._rescore_batch, RescoreRequest(
            Prompt(**prompt), tuple(int(j) for j in sample_idx), tuple(int(x) for x in seeds),
            np.atleast_2d(np.asarray(image_tokens, dtype=np.int64)), np.asarray(logprobs, dtype=np.float32),
            mode, float(threshold))))

    @staticmethod
    async def _pieces(handler, request) -> list[dict]:
        return await asyncio.gather(*[handler(piece) for piece in request.pieces()])

    @staticmethod
    def _rows(parts: list[dict]) -> dict:
        """Verdict rows of a call's pieces, each keeping the policy_version of its own piece (a weight swap may
        fall between two pieces)."""
        return {"rows": [{**r, "policy_version": a["policy_version"]} for a in parts for r in a["rows"]],
                "policy_version": min(a["policy_version"] for a in parts)}

    async def logprobs(self, prompts: list[str], image_tokens) -> dict:
        async with self._lock:
            version = self.policy_version
            out = await asyncio.to_thread(local_reference(self.model, self.max_batch_size), prompts,
                                          np.asarray(image_tokens).tolist())
        return {"logprobs": out, "policy_version": version}

    async def decode(self, image_tokens) -> dict:
        """Pixels of image tokens (uint8, channels last): report grids without a model in the caller."""
        tokens = torch.as_tensor(np.atleast_2d(np.array(image_tokens, dtype=np.int64)))
        async with self._lock:
            images = await asyncio.to_thread(self.model.decode, tokens)
        return {"images": images}

    async def reencode(self, image_tokens) -> dict:
        """The tokens of the pictures image tokens decode to (decode, then the VQ encoder): training data."""
        tokens = torch.as_tensor(np.atleast_2d(np.array(image_tokens, dtype=np.int64)))
        async with self._lock:
            out = await asyncio.to_thread(self.model.reencode, tokens, self.max_batch_size)
        return {"image_tokens": out.numpy()}

    async def stats(self) -> dict:
        """Batches formed so far per method, as (images, model rows): what tests and benchmarks inspect."""
        return {**{m: list(b) for m, b in self.batches.items()}, "model_seconds": dict(self.model_seconds),
                "torch_threads": torch.get_num_threads(),
                "policy_version": self.policy_version, "checkpoint": self.checkpoint, "pid": os.getpid(),
                "max_batch_size": self.max_batch_size}

    # max_batch_size here is a placeholder: __init__ sets the configured one (in model rows).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05, batch_size_fn=batch_rows)
    async def _sample_batch(self, requests: list[SampleRequest]) -> list[dict]:
        answers, version = await self._run("sample", sample_requests, requests)
        self.m_images.inc(sum(len(r.seeds) for r in requests))
        return [{**a, "policy_version": version} for a in answers]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05, batch_size_fn=batch_rows)
    async def _score_batch(self, requests: list[ScoreRequest]) -> list[dict]:
        answers, version = await self._run("score", score_requests, requests)
        self.m_scored.inc(batch_rows(requests))
        return [{**a, "policy_version": version} for a in answers]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05, batch_size_fn=batch_rows)
    async def _self_judge_batch(self, requests: list[SelfJudgeRequest]) -> list[dict]:
        answers, version = await self._run("self_judge", lambda m, r: self_judge_requests(m, self.judge, r), requests)
        n = sum(len(r.sample_idx) for r in requests)
        self.m_images.inc(n)
        self.m_scored.inc(n)
        return [{"rows": a, "policy_version": version} for a in answers]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05, batch_size_fn=batch_rows)
    async def _rescore_batch(self, requests: list[RescoreRequest]) -> list[dict]:
        answers, version = await self._run("rescore", rescore_requests, requests)
        self.m_scored.inc(batch_rows(requests))
        return [{"rows": a, "policy_version": version} for a in answers]

    async def _run(self, method: str, fn, requests):
        # The model runs in a worker thread so that the replica's event loop keeps taking requests
        # (they form the next batch) and answering health checks during a long batch.
        async with self._lock:
            version = self.policy_version
            t0 = time.perf_counter()
            answers = await asyncio.to_thread(fn, self.model, requests)
            self.model_seconds[method] += time.perf_counter() - t0
        rows = batch_rows(requests)
        self.batches[method].append((len(requests), rows))
        self.m_rows.observe(rows, tags={"method": method})
        return answers, version

    # -- HTTP routes --
    @http_app.post("/sample")
    async def http_sample(self, body: SampleBody) -> dict:
        sampling = SamplingParams(body.guidance_scale, body.temperature, body.top_k, body.top_p)
        seeds = [image_seed(body.seed, body.prompt_id or body.prompt, j) for j in range(body.n)]
        a = await self.sample(body.prompt, seeds, dataclasses.asdict(sampling))
        tokens = a["tokens"]
        out = {"prompt": body.prompt, "seeds": seeds, "image_tokens": tokens.tolist(),
               "logprob": a["logprobs"].sum(-1).tolist(), "policy_version": a["policy_version"]}
        if body.png:
            async with self._lock:
                images = await asyncio.to_thread(self.model.decode, torch.as_tensor(tokens, dtype=torch.long))
            out["png_base64"] = [to_png_base64(im) for im in images]
        return out

    @http_app.post("/score")
    async def http_score(self, body: ScoreBody) -> dict:
        if body.mode not in ("logits", "generate"):
            raise HTTPException(422, f"mode must be logits or generate, got {body.mode!r}")
        if len(body.image_tokens) != self.model.n_image_tokens:
            raise HTTPException(422, f"image_tokens must hold {self.model.n_image_tokens} ids, "
                                     f"got {len(body.image_tokens)}")
        a = await self.score(body.prompt, [body.image_tokens], body.mode)
        p = a["p_aligned"][0]
        return {"prompt": body.prompt, "p_aligned": None if np.isnan(p) else p,
                "verdict": to_verdict(p, body.threshold), "answer": a["answers"][0],
                "policy_version": a["policy_version"]}

    @http_app.get("/version")
    async def http_version(self) -> dict:
        return {"policy_version": self.policy_version, "checkpoint": self.checkpoint or self.model_cfg["path"]}


# ---- building, deploying, reloading -------------------------------------------------------------------
def deployment_options(serve_cfg) -> dict:
    """ServeConfig -> Serve deployment options (replicas or autoscaling_config, resources, concurrency)."""
    s = plain_config(serve_cfg)
    opts = {"ray_actor_options": {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"]},
            "max_ongoing_requests": s["max_ongoing_requests"],
            "logging_config": deployment_logging(s)}
    if s.get("autoscaling_config"):
        opts["autoscaling_config"] = {k: v for k, v in s["autoscaling_config"].items() if v is not None}
    else:
        opts["num_replicas"] = s["num_replicas"]
    return opts


def build_app(model, serve_cfg, checkpoint: str | None = None, policy_version: int = 0, judge: dict | None = None):
    """The ModelServer application for `model` (a ModelConfig), configured by `serve_cfg` (a ServeConfig), its
    self_judge calls judged by `judge` too (a spec for gapray.serve.judge.replica_judge; None: no external judge)."""
    m, s = plain_config(model), plain_config(serve_cfg)
    if m.get("device", "auto") == "auto" and s["num_gpus"] == 0:
        m["device"] = "cpu"  # no GPU asked for: never grab one that happens to be visible
    init = {"model": m, "max_batch_size": s["max_batch_size"], "batch_wait_timeout_s": s["batch_wait_timeout_s"],
            "judge": judge, "gpu_share": s["num_gpus"]}
    # Serve restarts replicas whenever the deployment's code version changes, and serve.run draws a random
    # one per call; pinning it to what the replicas are built from makes a redeploy that changes only
    # user_config (a new checkpoint) a call to reconfigure() on the live replicas. (Config-file deploys,
    # `serve deploy conf/serve.yaml`, get the same behaviour from Serve itself.)
    version = hashlib.blake2b(json.dumps(init, sort_keys=True).encode(), digest_size=8).hexdigest()
    return ModelServer.options(
        **deployment_options(s), user_config={"checkpoint": checkpoint, "policy_version": int(policy_version)},
        version=version, _internal=True,
    ).bind(**init)


def app_builder(args: dict):
    """Entry point of `serve run conf/serve.yaml` (import_path gapray.serve.server:app_builder).

    `args` holds `model` (a preset name, directory or hub id, or a mapping of ModelConfig keys) and
    `serve` (ServeConfig keys); both are checked against the typed schemas like any gapray config.
    """
    model = args.get("model", "tiny")
    overrides = [f"model={model}"] if isinstance(model, str) else _dotlist(model, "model")
    cfg = load_config(ServeAppConfig, overrides=overrides + _dotlist(args.get("serve", {}), "serve"))
    unknown = set(args) - {"model", "serve"}
    if unknown:
        raise UserError(f"serve app args: unknown keys {sorted(unknown)}; valid: model, serve")
    return build_app(cfg.model, cfg.serve)


def _dotlist(tree: dict, prefix: str) -> list[str]:
    out = []
    for k, v in (tree or {}).items():
        key = f"{prefix}.{k}"
        out += _dotlist(v, key) if isinstance(v, dict) else [f"{key}={'null' if v is None else v}"]
    return out


def deploy(model, serve_cfg, *, name: str | None = None, route_prefix: str | None | bool = True,
           checkpoint: str | None = None, policy_version: int = 0, judge: dict | None = None):
    """Deploy (or update) the ModelServer app and wait until it is running; returns its handle.

    route_prefix=True takes serve_cfg.route_prefix; None serves handles only (no HTTP route). `judge`: see
    build_app (a VLM judge's JudgeServer app is deployed first, by gapray.serve.judge.deploy_judge).
    """
    s = plain_config(serve_cfg)
    start_serve(s["http_port"], s.get("log_level", "WARNING"))
    app = build_app(model, s, checkpoint=checkpoint, policy_version=policy_version, judge=judge)
    prefix = s["route_prefix"] if route_prefix is True else route_prefix
    return serve.run(app, name=name or s["app_name"], route_prefix=prefix)


def reload(model, serve_cfg, *, checkpoint: str | None, policy_version: int, name: str | None = None,
           route_prefix: str | None | bool = True, judge: dict | None = None):
    """Serve a new policy on the live replicas (no restart); answers from then on carry policy_version.

    `model` and `serve_cfg` must be those the app was deployed with: only the user_config changes.
    checkpoint=None goes back to the weights `model` names.
    """
    return deploy(model, serve_cfg, name=name, route_prefix=route_prefix, checkpoint=checkpoint,
                  policy_version=policy_version, judge=judge)


def handle(app_name: str):
    return serve.get_deployment_handle(DEPLOYMENT, app_name)


def replica_actor_names(app_name: str) -> list[str]:
    """Names of the live ModelServer replica actors of an app (namespace "serve"), e.g. to kill one."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


def http_url(route_prefix: str) -> str:
    """Base URL of an app's HTTP routes on the running Serve proxy (always 127.0.0.1)."""
    from ray.serve.context import _get_global_client  # the proxy's port is not exposed publicly

    return f"http://127.0.0.1:{_get_global_client().http_config.port}{route_prefix}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests and benchmarks: several Ray sessions may share a machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
