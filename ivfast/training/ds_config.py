"""The DeepSpeed config, written from the run config (never edited by hand)."""
from __future__ import annotations

from ivfast.config import Config


def deepspeed_config(cfg: Config, bf16: bool) -> dict:
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
        )
    if ds.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update(stage3_prefetch_bucket_size=ds.allgather_bucket_size,
                    stage3_param_persistence_threshold=ds.param_persistence_threshold)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Warn"},
    }
