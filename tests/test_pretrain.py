"""The shapes-world pretraining recipe (gapray/world/pretrain.py, jobs/pretrain_world.py) on its real
architecture, a few steps at most: what each objective computes, not whether a long run converges."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gapray.models.janus import image_token_logprobs
from gapray.models.sampler import uncond_input_ids
from gapray.world import load_world_prompts
from gapray.world.pretrain import (Judged, answer_text, build_world_model, generation_loss, render_batch,
                                   understanding_loss)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    return build_world_model(seed=0)


def test_vocabulary_covers_every_world_prompt(world):
    unk = world.tokenizer.unk_token_id
    for split in ("train", "eval", "composition"):
        for row in load_world_prompts(split):
            assert unk not in world.tokenizer.encode(row["prompt"]), row["prompt"]
    assert world.image_size == 32 and world.n_image_tokens == 64


def test_encode_images_then_decode_is_image_sized(world):
    rows = load_world_prompts("train")[:5]
    tokens = world.encode_images(render_batch(rows, np.random.default_rng(0)))
    assert tokens.shape == (5, 64) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < world.model.model.vqmodel.quantize.num_embeddings
    images = world.decode(tokens)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8


def test_understanding_loss_weighs_the_digit_fully(world):
    """digit cross-entropy + 0.1 x each format token's, computed by hand from the full forward pass."""
    rows = load_world_prompts("train")[:2]
    images = render_batch(rows, np.random.default_rng(1))
    pool = Judged([r["prompt"] for r in rows], images, np.array([1, 0]))
    got = understanding_loss(world, pool, np.arange(2), format_weight=0.1)
    texts = [world.verdict_text(p) + answer_text(world, int(label)) for p, label in zip(pool.prompts, pool.labels)]
    enc = world.processor(text=texts, images=list(images), generation_mode="text", padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = world.model(**enc).logits.float()
    answer = world.tokenizer.encode(answer_text(world, 1), add_special_tokens=False)
    n, digit = len(answer), answer.index(world.tokenizer.convert_tokens_to_ids("1"))
    ce = F.cross_entropy(logits[:, -n - 1:-1].transpose(1, 2), enc["input_ids"][:, -n:], reduction="none")
    weights = torch.full((n,), 0.1)
    weights[digit] = 1.0
    torch.testing.assert_close(got.detach(), (ce * weights).sum(1).mean(), atol=1e-5, rtol=0)
    assert enc["input_ids"][0, -n + digit] == world.tokenizer.convert_tokens_to_ids("1")
    assert enc["input_ids"][1, -n + digit] == world.tokenizer.convert_tokens_to_ids("0")


def test_understanding_batches_balance_renders_and_optionally_own_generations():
    """Half the batch renders (label-balanced), half own generations: at their natural share by default
    (here 1 right in 20), at own_positive_share when given."""
    labels = np.array([0] * 10 + [1] * 10 + [1] * 2 + [0] * 38)
    own = np.array([False] * 20 + [True] * 40)
    pool = Judged(["p"] * 60, np.zeros((60, 1, 1, 3), np.uint8), labels, own)
    rng = np.random.default_rng(0)
    natural = np.concatenate([pool.batch(40, rng) for _ in range(200)])
    shared = np.concatenate([pool.batch(40, rng, own_positive_share=0.25) for _ in range(200)])
    for idx in (natural, shared):
        assert len(idx) == 8000 and own[idx].sum() == 4000
        assert (labels[idx][~own[idx]] == 1).sum() == 2000  # renders exactly balanced
    assert (labels[shared][own[shared]] == 1).sum() == 1000  # exactly a quarter of the own rows
    assert abs((labels[natural][own[natural]] == 1).mean() - 0.05) < 0.015  # their share in the pool


def test_generation_loss_drops_prompts_as_cfg_uncond_rows(world):
    """With p_uncond=1 every row is CFG's unconditional row: the loss is the NLL under those prompt ids."""
    rows = load_world_prompts("train")[:3]
    got = generation_loss(world, rows, np.random.default_rng(2), p_uncond=1.0)
    tokens = world.encode_images(render_batch(rows, np.random.default_rng(2)))  # the same draws
    enc = world.generation_inputs([r["prompt"] for r in rows])
    ids = uncond_input_ids(enc["input_ids"], [world.bos_id, world.boi_id], world.pad_id)
    with torch.no_grad():
        expected = -image_token_logprobs(world.model, ids, enc["attention_mask"], tokens).mean()
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    cond = generation_loss(world, rows, np.random.default_rng(2), p_uncond=0.0)
    assert abs(cond.item() - got.item()) > 1e-4  # the prompt matters to the conditional rows


def test_job_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("earlier work")
    proc = subprocess.run([sys.executable, "jobs/pretrain_world.py", f"out_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "earlier work"


def test_job_refuses_vq_from_with_init_from(tmp_path):
    """init_from continues a model with its own VQ tokenizer; a vq_from beside it would silently swap the tokenizer
    the language model was trained on (it happened: a run continued on another VQ's codes)."""
    shipped = str(ROOT / "gapray/assets/shapes-janus")
    proc = subprocess.run([sys.executable, "jobs/pretrain_world.py", f"out_dir={tmp_path / 'out'}", f"vq_from={shipped}",
                           f"init_from={shipped}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "vq_from and init_from" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
