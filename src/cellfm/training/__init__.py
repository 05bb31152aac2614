"""Pretraining: `TrainConfig` (TOML), `pretrain` (single process / DDP / FSDP2), DCP checkpoints,
the warmup-cosine schedule and the held-out masked-value evaluation."""

from cellfm.training.config import TrainConfig
from cellfm.training.evaluate import masked_value_mse, per_gene_mean_mse, per_gene_means
from cellfm.training.loop import export_model, pretrain
from cellfm.training.optim import param_groups, warmup_cosine

__all__ = ["TrainConfig", "pretrain", "export_model", "masked_value_mse", "per_gene_means",
           "per_gene_mean_mse", "param_groups", "warmup_cosine"]
