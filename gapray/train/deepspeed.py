"""The DeepSpeed config gapray generates, and DeepSpeed without JIT compiles on CPU.

Config: ZeRO stage 0-3 from `TrainConfig.deepspeed`, optimizer-state offload (stages 1-3) and parameter
offload (stage 3), bf16 on GPUs, micro-batch and accumulation from the trainer, clipping from `optim`.
There is never an "optimizer" or "scheduler" section: the trainer hands deepspeed.initialize a torch
AdamW and LambdaLR, so DeepSpeed builds neither FusedAdam nor DeepSpeedCPUAdam (both JIT-compiled C++/CUDA
ops; cpu_adam takes ~90 s here). With offload that needs "zero_force_ds_cpu_optimizer": false, the
documented switch for a client optimizer under ZeRO-Offload: torch's AdamW then steps the offloaded fp32
states on the CPU, slower than cpu_adam on big models, with nothing to build.

JIT on CPU: DeepSpeed's CPU accelerator builds a shared-memory allreduce op (`deepspeed_shm_comm`, ~60 s
of g++) whenever a comm backend starts (deepspeed.comm.torch.TorchBackend -> build_shm_op). The
accelerator abstraction is DeepSpeed's documented extension point (deepspeed.accelerator.set_accelerator,
DeepSpeedAccelerator.create_op_builder), and build_shm_op treats a `None` builder as "no such op" and
keeps plain torch.distributed (gloo). `prebuilt_ops_cpu_accelerator()` is the stock CPU accelerator that
returns None for any op that was not pre-built at install (deepspeed.git_version_info.installed_ops), so
a CPU run never compiles. tests/test_train_ray.py fails if a DeepSpeed run builds anything into
TORCH_EXTENSIONS_DIR, and pins the None contract of the accelerator.
"""

from __future__ import annotations

import functools

from omegaconf import DictConfig

QUIET_STEPS = 2**31 - 1  # DeepSpeed's own per-step prints: we log through ray.train.report


def deepspeed_config(cfg: DictConfig, use_gpu: bool) -> dict:
    """The DeepSpeed JSON config for a TrainConfig."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    bf16 = use_gpu if ds.bf16 is None else ds.bf16
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also under offload: no cpu_adam build
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def use_prebuilt_ops_only() -> None:
    """On the CPU accelerator, make DeepSpeed use only ops that were built at install time (no JIT).

    Call in every worker before deepspeed.initialize. A no-op on GPU accelerators (NCCL needs no op).
    """
    from deepspeed.accelerator import get_accelerator, set_accelerator

    cls = prebuilt_ops_cpu_accelerator()
    current = get_accelerator()
    if current.device_name() == "cpu" and not isinstance(current, cls):
        set_accelerator(cls())


@functools.cache
def prebuilt_ops_cpu_accelerator() -> type:
    """The class, built on first use: `import gapray.train` must not import deepspeed (seconds, a probe)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.git_version_info import installed_ops

    class PrebuiltOpsCPUAccelerator(CPU_Accelerator):
        """DeepSpeed's CPU accelerator, minus every op that would need a JIT compile."""

        def create_op_builder(self, op_name):
            builder = super().create_op_builder(op_name)
            if builder is None or not installed_ops.get(builder.NAME, False):
                return None  # callers (build_shm_op, build_ccl_op) fall back to torch.distributed
            return builder

    return PrebuiltOpsCPUAccelerator
