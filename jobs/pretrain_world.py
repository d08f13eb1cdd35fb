"""Pretrain the shapes-world Janus from scratch: `python jobs/pretrain_world.py [key=value ...]`.

Stage 1 trains the VQ image tokenizer on renders, stage 2 the language model on generation (prompt ->
image tokens) and understanding (the verdict question, answered from the oracle's label) together.
Seeded: the same seed gives the same model on the same machine and torch build. Writes a
save_pretrained directory (model + processor) to `out_dir`; copy it to gapray/assets/shapes-janus to
ship it. Only train-split prompts are used. Runs locally (no Ray): ~2.3M parameters, CPU.
"""

import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str]) -> int:
    import torch
    from omegaconf import OmegaConf

    from gapray.config import CONF_DIR, PretrainConfig, load_config
    from gapray.models import JanusModel
    from gapray.errors import UserError
    from gapray.world.grammar import dev_split, load_world_prompts
    from gapray.world.pretrain import build_world_model, train_lm, train_vq, vq_round_trip_accuracy

    try:
        cfg = load_config(PretrainConfig, CONF_DIR / "pretrain_world.yaml", argv)
        for key in ("vq_from", "init_from"):
            if cfg[key] and not (Path(cfg[key]) / "config.json").is_file():
                raise UserError(f"{key}: '{cfg[key]}' is not a saved model directory (no config.json)")
        if cfg.vq_from and cfg.init_from:  # init_from loads the VQ too: a second one would replace it silently
            raise UserError("vq_from and init_from both set: init_from continues a model with its own VQ "
                            "tokenizer; pass vq_from=null with init_from, or drop init_from")
        out = Path(cfg.out_dir)
        if out.exists() and any(out.iterdir()) and not cfg.overwrite:
            raise UserError(f"out_dir '{out}' is not empty; choose another out_dir or pass overwrite=true")
    except UserError as e:
        print(f"pretrain_world: error: {e}", file=sys.stderr)
        return 2

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rows, dev = dev_split(load_world_prompts("train"), cfg.dev_prompts)  # dev: for progress checks only
    t0 = time.perf_counter()
    if cfg.init_from:  # continue an earlier run: every weight, tokenizer included, in its own architecture
        model = JanusModel.from_pretrained(cfg.init_from, device=cfg.device)
        log(f"all weights loaded from {cfg.init_from}")
    else:
        model = build_world_model(cfg.seed, cfg.device, hidden_size=cfg.lm_hidden, num_layers=cfg.lm_layers,
                                  num_heads=cfg.lm_heads, intermediate_size=cfg.lm_intermediate)
    if cfg.vq_from:  # stage 1 done before: start from that tokenizer (and train it further if vq_steps > 0)
        trained = JanusModel.from_pretrained(cfg.vq_from).model.model.vqmodel
        model.model.model.vqmodel.load_state_dict(trained.state_dict())
        log(f"VQ tokenizer loaded from {cfg.vq_from}")
    if cfg.vq_steps > 0:
        train_vq(model, rows, cfg.vq_steps, batch=cfg.vq_batch, lr=cfg.vq_lr, seed=cfg.seed, log=log)
        stage1 = out.with_name(out.name + "-vq")  # stage 1's model, reusable with vq_from=
        model.save_pretrained(str(stage1))
        log(f"stage 1 saved to {stage1}")
    vq_seconds = time.perf_counter() - t0
    ceiling = vq_round_trip_accuracy(model, rows)
    log(f"VQ done in {vq_seconds:.0f}s; oracle accepts {ceiling:.1%} of round-tripped renders")

    saved_at = []

    def save(lm_steps_done: int | None = None) -> None:
        """The model as a save_pretrained dir (+ pretrain.json); during stage 2 also after each progress check,
        so that an interrupted run leaves its latest model behind."""
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        stored = copy.deepcopy(model.model).to(getattr(torch, cfg.save_dtype))  # training goes on in float32
        JanusModel(stored, model.processor).save_pretrained(str(out))
        (out / "pretrain.json").write_text(json.dumps({
            "config": OmegaConf.to_container(cfg), "lm_steps_done": lm_steps_done or cfg.lm_steps,
            "seconds": round(seconds, 1), "vq_seconds": round(vq_seconds, 1),
            "vq_round_trip_oracle_accuracy": ceiling, "torch": torch.__version__}, indent=2))
        log(f"saved {out} after {lm_steps_done or cfg.lm_steps} LM steps ({seconds / 60:.1f} min)")
        saved_at.append(lm_steps_done or cfg.lm_steps)

    if cfg.lm_steps > 0:
        train_lm(model, rows, cfg.lm_steps, gen_batch=cfg.gen_batch, und_batch=cfg.und_batch, lr=cfg.lm_lr,
                 self_generated_at=tuple(cfg.self_generated_at), self_generated_k=cfg.self_generated_k,
                 dev_rows=dev, seed=cfg.seed, log=log, on_dev_check=save, pool_prompts=cfg.pool_prompts,
                 self_generated_prompts=cfg.self_generated_prompts, checks=cfg.checks,
                 task_alpha=cfg.task_alpha, own_positive_share=cfg.own_positive_share)
    if saved_at[-1:] != [cfg.lm_steps]:  # the last progress check, at the last step, saved it already
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
