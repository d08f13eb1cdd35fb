"""Post-training the generation side on the model's own verdicts: SFT and DPO on image tokens, on Ray Train
with DeepSpeed ZeRO (backend=ray) or in one process (backend=local). `run_training(cfg)` is the entry."""

from gapray.train.checkpoint import TrainState
from gapray.train.loop import TrainResult, read_metrics, run_training

__all__ = ["TrainResult", "TrainState", "read_metrics", "run_training"]
