"""Training objectives (gapray/train/losses.py) and the plain-PyTorch loop (backend=local), on the tiny model.

`make_preference_dir` writes a small preference dir with the real schemas from images the tiny model
samples itself; tests/test_train_ray.py uses it too.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from gapray.config import CONF_DIR, TrainConfig, load_config
from gapray.data.schemas import DPO_SCHEMA, SFT_SCHEMA
from gapray.errors import UserError
from gapray.models import SamplingParams
from gapray.train import read_metrics, run_training
from gapray.train.losses import dpo_loss, sft_loss

LN2 = math.log(2)
ROOT = Path(__file__).resolve().parent.parent


def make_preference_dir(tiny, path, n_pairs: int = 16, with_ref: bool = True, seed: int = 1) -> str:
    """sft.parquet (both images of each prompt) and dpo.parquet (image 0 chosen, image 1 rejected), drawn
    by the tiny model; reference log-probs (conditional sums) from the same model when `with_ref`."""
    words = [f"a photo of a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "triangle", "squares")]
    prompts = [words[i % len(words)] for i in range(n_pairs)]
    out = tiny.sample(prompts, 2, SamplingParams(guidance_scale=5.0), seeds=seed)
    chosen, rejected = out.tokens[0::2], out.tokens[1::2]
    with torch.no_grad():
        ref_c = tiny.image_logprobs(prompts, chosen).sum(-1)
        ref_r = tiny.image_logprobs(prompts, rejected).sum(-1)
    dpo = [dict(round=0, prompt_id=f"p{i}", task="color", prompt=p, chosen_tokens=chosen[i].tolist(),
                rejected_tokens=rejected[i].tolist(), chosen_p=0.9, rejected_p=0.2,
                ref_chosen_logp=float(ref_c[i]) if with_ref else None,
                ref_rejected_logp=float(ref_r[i]) if with_ref else None) for i, p in enumerate(prompts)]
    sft = [dict(round=0, prompt_id=f"p{i // 2}", task="color", prompt=prompts[i // 2], sample_idx=i % 2,
                image_tokens=out.tokens[i].tolist(), p_aligned=0.9) for i in range(len(out.tokens))]
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(dpo, schema=DPO_SCHEMA), Path(path) / "dpo.parquet")
    pq.write_table(pa.Table.from_pylist(sft, schema=SFT_SCHEMA), Path(path) / "sft.parquet")
    return str(path)


@pytest.fixture(scope="module")
def pref_dir(tiny, tmp_path_factory):
    return make_preference_dir(tiny, tmp_path_factory.mktemp("pref"))


def train_cfg(*overrides: str):
    return load_config(TrainConfig, CONF_DIR / "train.yaml", list(overrides))


# ---- the loss functions against their formulas -----------------------------------------------------------
def logps(*rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", LN2), ("robust", LN2), ("hinge", 1.0),
                                                ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_dpo_loss_when_policy_equals_reference(loss_type, expected):
    """Zero margin: sigmoid and robust give ln 2 (whatever beta and label smoothing), hinge 1, ipo (1/2beta)^2;
    rewards are all zero and no pair counts as won."""
    pol = torch.randn(3, 8, dtype=torch.float64)
    ref = pol.sum(-1)
    loss, m = dpo_loss(pol, pol.flip(0), ref, ref.flip(0), beta=0.1, loss_type=loss_type,
                       label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0)
    assert abs(loss.item() - expected) < 1e-12
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/margins"] == m["rewards/accuracies"] == 0


def test_dpo_loss_values_follow_trl_formulas():
    """Per pair, m = (chosen - ref_chosen) - (rejected - ref_rejected) summed over tokens; losses as TRL."""
    beta, eps, T = 0.5, 0.2, 4
    chosen = logps([-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0])  # sums -4, -8
    rejected = logps([-2.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0])  # sums -8, -4
    ref_c, ref_r = logps(-5.0, -6.0), logps(-7.0, -5.0)
    m = torch.tensor([(-4 + 5) - (-8 + 7), (-8 + 6) - (-4 + 5)], dtype=torch.float64)  # [2, -3]
    ls = F.logsigmoid
    expected = {
        "sigmoid": (-ls(beta * m) * (1 - eps) - ls(-beta * m) * eps).mean(),
        "robust": ((-ls(beta * m) * (1 - eps) + ls(-beta * m) * eps) / (1 - 2 * eps)).mean(),
        "hinge": torch.relu(1 - beta * m).mean(),
        "ipo": ((m / T - 1 / (2 * beta)) ** 2).mean(),
    }
    for loss_type, want in expected.items():
        loss, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(loss, want, atol=1e-12, rtol=0)
    # TRL's metrics: rewards are beta * summed log-ratios; accuracy counts chosen reward > rejected reward
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(beta * (1 - 2) / 2, dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(beta * (-1 + 1) / 2, dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards/margins"], (beta * m).mean())
    assert metrics["rewards/accuracies"] == 0.5
    assert metrics["logps/chosen"] == -6.0 and metrics["logps/rejected"] == -6.0


def test_average_logps_and_rpo_alpha():
    """average_logps divides the margin by the token count; rpo_alpha adds alpha x the chosen images' mean NLL."""
    chosen, rejected = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    ref_c, ref_r = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    m = (chosen.sum(-1) - ref_c) - (rejected.sum(-1) - ref_r)
    avg, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.3, average_logps=True)
    torch.testing.assert_close(avg, -F.logsigmoid(0.3 * m / 6).mean(), atol=1e-12, rtol=0)
    plain, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.3)
    rpo, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.3, rpo_alpha=0.7)
    torch.testing.assert_close(rpo, plain + 0.7 * -chosen.mean(), atol=1e-12, rtol=0)
    torch.testing.assert_close(metrics["nll_loss"], -chosen.mean())


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    rejected = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises log pi(x+), lowers log pi(x-)


def test_sft_loss_is_mean_token_nll(tiny):
    """SFT on the tiny model's teacher-forced log-probs equals cross-entropy of the generation head's logits."""
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    tokens = tiny.sample(prompts, 1, SamplingParams(guidance_scale=3.0), seeds=5).tokens
    with torch.no_grad():
        loss, m = sft_loss(tiny.image_logprobs(prompts, tokens))
        enc = tiny.generation_inputs(prompts)
        embeds = torch.cat([tiny.model.get_input_embeddings()(enc["input_ids"]),
                            tiny.model.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(tokens[:, :-1])], 1)
        h = tiny.model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = tiny.model.model.generation_head(h[:, enc["input_ids"].shape[1] - 1:])
        ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - ce.item()) < 1e-5
    assert abs(m["logps"].item() + ce.item() * tokens.shape[1]) < 1e-3


# ---- the loop on plain PyTorch (backend=local) -------------------------------------------------------------
LOCAL = ("backend=local", "micro_batch_size=4", "optim.learning_rate=5e-3",
         "trainable=[language_model,generation_head]")


def epoch_means(rows: list[dict], key: str, steps_per_epoch: int) -> list[float]:
    return [float(np.mean([r[key] for r in rows[i:i + steps_per_epoch]])) for i in range(0, len(rows), steps_per_epoch)]


def test_local_dpo_starts_at_ln2_then_learns(tiny_dir, pref_dir, tmp_path):
    """Policy = reference at step 0, with the reference log-probs precomputed in the data (tests/test_train_ray.py
    covers the frozen-copy reference): the first loss is ln 2 (1e-5). Four epochs over 16 pairs then lower
    the loss and win more pairs."""
    cfg = train_cfg(f"data={pref_dir}", f"model={tiny_dir}", f"run_dir={tmp_path}", "epochs=4",
                    "loss.reference=data", *LOCAL)
    result = run_training(cfg)
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17)) and result.steps == 16
    assert abs(rows[0]["loss"] - LN2) < 1e-5
    assert rows[0]["rewards/accuracies"] == 0 and abs(rows[0]["rewards/margins"]) < 1e-5
    loss, acc = epoch_means(rows, "loss", 4), epoch_means(rows, "rewards/accuracies", 4)
    assert loss[-1] < loss[0] - 0.1, loss
    assert acc[-1] > acc[0] + 0.25 and acc[-1] >= 0.9, acc
    assert Path(result.model_dir, "model.safetensors").is_file()


def test_local_sft_lowers_nll(tiny_dir, tmp_path):
    """SFT on images that carry structure (each colour draws from its own 16 of the 64 codes, as accepted
    images of one concept share content): the NLL starts at ln 64 (a fresh tiny model is near uniform) and
    falls epoch after epoch towards the data's ln 16."""
    rng = np.random.default_rng(0)
    rows = [dict(round=0, prompt_id=f"p{i}", task="color", prompt=f"a photo of a {color} circle", sample_idx=0,
                 image_tokens=(16 * c + rng.integers(0, 16, 64)).tolist(), p_aligned=0.9)
            for i in range(32) for c, color in [(i % 3, ("red", "blue", "green")[i % 3])]]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), tmp_path / "data" / "sft.parquet")
    cfg = train_cfg(f"data={tmp_path / 'data'}", f"model={tiny_dir}", f"run_dir={tmp_path / 'run'}", "objective=sft",
                    "epochs=3", *LOCAL)
    run_training(cfg)
    loss = epoch_means(read_metrics(cfg.run_dir), "loss", 8)  # 32 images / 4 per step
    assert abs(read_metrics(cfg.run_dir)[0]["loss"] - math.log(64)) < 0.05
    assert loss[0] > loss[1] > loss[2] and loss[2] < loss[0] - 0.1, loss


def test_gradient_accumulation_matches_a_larger_batch(tiny_dir, pref_dir, tmp_path):
    """2 accumulated micro-batches of 2 pairs = one batch of 4 (the same rows per optimizer step): the same
    logged losses (1e-6) and trained weights within 5e-5 after 4 steps (measured 8e-6: fp32 sums in another
    order, which Adam's normalised step amplifies where gradients are tiny; training moves them > 1e-3)."""
    from safetensors.torch import load_file

    rows, w = {}, {}
    for name, mb, ga in (("ga", 2, 2), ("big", 4, 1)):
        cfg = train_cfg(f"data={pref_dir}", f"model={tiny_dir}", f"run_dir={tmp_path / name}", *LOCAL,
                        f"micro_batch_size={mb}", f"gradient_accumulation_steps={ga}")
        w[name] = load_file(str(Path(run_training(cfg).model_dir) / "model.safetensors"))
        rows[name] = read_metrics(cfg.run_dir)
    assert len(rows["ga"]) == len(rows["big"]) == 4
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["ga"], rows["big"])) < 1e-6
    assert max((w["ga"][k] - w["big"][k]).abs().max().item() for k in w["ga"]) < 5e-5
    initial = load_file(str(Path(tiny_dir) / "model.safetensors"))
    assert max((w["big"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3


def test_train_config_errors_are_one_line(pref_dir, tmp_path):
    with pytest.raises(UserError, match=r"data: '.*sft.parquet' not found .*holds: dpo.parquet"):
        only_dpo = tmp_path / "only_dpo"
        only_dpo.mkdir()
        (only_dpo / "dpo.parquet").write_bytes((Path(pref_dir) / "dpo.parquet").read_bytes())
        run_training(train_cfg(f"data={only_dpo}", "objective=sft", "backend=local", f"run_dir={tmp_path / 'r'}"))
    with pytest.raises(UserError, match="did you mean 'sigmoid'"):
        train_cfg(f"data={pref_dir}", "loss.loss_type=sigmod")
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        run_training(train_cfg(f"data={pref_dir}", "backend=local", "micro_batch_size=64",
                               f"run_dir={tmp_path / 'r2'}"))


def test_reference_data_needs_the_columns(tiny, tmp_path):
    no_ref = make_preference_dir(tiny, tmp_path / "no_ref", n_pairs=4, with_ref=False)
    with pytest.raises(UserError, match="loss.reference=data: .* lacks complete"):
        run_training(train_cfg(f"data={no_ref}", "loss.reference=data", "backend=local", f"run_dir={tmp_path / 'r'}"))


def test_job_entry_user_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), f"data={tmp_path}/missing", "backend=local"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"jobs/train.py: error: data: '{tmp_path}/missing/dpo.parquet' not found (objective=dpo reads dpo.parquet; "
        f"'{tmp_path}/missing' holds: nothing)"]


def test_sft_cfg_dropout_trains_the_unconditional_row(tiny, tiny_dir, tmp_path):
    """loss.uncond_prob: the rows it picks (a hash of seed, epoch, prompt and tokens: the same whatever the
    batching) are trained as CFG's unconditional row; with every row picked, the first loss is the NLL of the
    images under the unconditional prompt, not under their own."""
    from gapray.models.janus import image_token_logprobs
    from gapray.models.sampler import uncond_input_ids
    from gapray.train import data as tdata

    prompts = [f"a photo of a {c} circle" for c in ("red", "blue", "green", "red")]
    tokens = tiny.sample(prompts, 1, SamplingParams(guidance_scale=3.0), seeds=7).tokens
    rows = {"prompt": np.array(prompts, object), "image_tokens": np.array([t.numpy() for t in tokens] + [None], object)[:-1]}
    many = {"prompt": np.array([f"p{i}" for i in range(2000)], object),
            "image_tokens": np.array([np.array([i], np.int64) for i in range(2000)] + [None], object)[:-1]}
    share = tdata.uncond_rows(many, 0.1, 0, 0)
    assert 0.08 < share.mean() < 0.12
    assert not np.array_equal(share, tdata.uncond_rows(many, 0.1, 0, 1))  # drawn again each epoch
    sub = {k: v[500:700] for k, v in many.items()}
    assert np.array_equal(tdata.uncond_rows(sub, 0.1, 0, 0), share[500:700])  # a row's fate ignores its batch

    uncond = lambda ids: uncond_input_ids(ids, [tiny.bos_id, tiny.boi_id], tiny.pad_id)
    batch = tdata.collate(rows, tiny.generation_inputs, (np.array([True, False, True, False]), uncond))
    cond = tiny.generation_inputs(prompts)["input_ids"]
    assert torch.equal(batch["input_ids"][1], cond[1]) and torch.equal(batch["input_ids"][3], cond[3])
    assert torch.equal(batch["input_ids"][0], uncond(cond)[0]) and not torch.equal(batch["input_ids"][0], cond[0])

    sft = [dict(round=0, prompt_id=f"p{i}", task="t", prompt=p, sample_idx=0, image_tokens=t.tolist(), p_aligned=1.0)
           for i, (p, t) in enumerate(zip(prompts, tokens))]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(sft, schema=SFT_SCHEMA), tmp_path / "data" / "sft.parquet")
    first = {}
    for prob in (0.0, 0.999999):
        cfg = train_cfg(f"data={tmp_path / 'data'}", f"model={tiny_dir}", f"run_dir={tmp_path / str(prob)}",
                        "objective=sft", "epochs=1", "shuffle_buffer=0", f"loss.uncond_prob={prob}", *LOCAL)
        run_training(cfg)
        first[prob] = read_metrics(cfg.run_dir)[0]["loss"]
    enc = tiny.generation_inputs(prompts)
    with torch.no_grad():
        nll_cond = -image_token_logprobs(tiny.model, enc["input_ids"], enc["attention_mask"], tokens).mean()
        nll_uncond = -image_token_logprobs(tiny.model, uncond(enc["input_ids"]), enc["attention_mask"], tokens).mean()
    assert abs(first[0.0] - nll_cond.item()) < 2e-5 and abs(first[0.999999] - nll_uncond.item()) < 2e-5
    assert abs(nll_cond.item() - nll_uncond.item()) > 2e-4  # (a fresh tiny model barely reads its prompt)


def test_a_metrics_log_cut_short_by_a_kill_is_read_and_resumed(tmp_path):
    """A worker killed while appending leaves half a line: it is dropped (its step runs again), not a crash."""
    from gapray.train.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    whole = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "loss": 0.8}\n'
    path.write_text(whole + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    MetricsLog(str(tmp_path), enabled=True, resume_step=2)  # resumed from the step-2 checkpoint
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'


def test_gradient_checkpointing_changes_memory_not_the_result(tiny_dir, pref_dir, tmp_path):
    """train.gradient_checkpointing recomputes the language model's activations in backward: the same losses and
    trained weights as without it (1e-6), and the layers really run again (a forward-call count)."""
    from safetensors.torch import load_file

    from gapray.train import loop

    calls, w, rows = {}, {}, {}
    prepare = loop.prepare_model

    def counting(cfg, reference):
        jm, policy, params, ref = prepare(cfg, reference)
        layer = jm.model.model.language_model.layers[0].self_attn  # inside the checkpointed layer.forward
        layer.register_forward_hook(lambda *a: calls.__setitem__(cfg.run_dir, calls.get(cfg.run_dir, 0) + 1))
        return jm, policy, params, ref

    loop.prepare_model = counting
    try:
        for on in (False, True):
            cfg = train_cfg(f"data={pref_dir}", f"model={tiny_dir}", f"run_dir={tmp_path / str(on)}", *LOCAL,
                            f"gradient_checkpointing={str(on).lower()}")
            w[on] = load_file(str(Path(run_training(cfg).model_dir) / "model.safetensors"))
            rows[on] = [r["loss"] for r in read_metrics(cfg.run_dir)]
    finally:
        loop.prepare_model = prepare
    assert len(rows[True]) == 4 and max(abs(a - b) for a, b in zip(rows[True], rows[False])) < 1e-6
    assert max((w[True][k] - w[False][k]).abs().max().item() for k in w[True]) < 1e-6
    assert calls[str(tmp_path / "True")] > calls[str(tmp_path / "False")]  # recomputed in backward
