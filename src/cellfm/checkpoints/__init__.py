"""Checkpoint formats: the official MindSpore and CellFM-torch files (our own folder format is
`CellFM.save` / `CellFM.load`)."""

from cellfm.checkpoints.mindspore_ckpt import (
    CheckpointFormatError,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)
from cellfm.checkpoints.official import (
    convert_checkpoint,
    infer_config,
    load_official_checkpoint,
    official_to_ours,
    read_torch_checkpoint,
)

__all__ = ["CheckpointFormatError", "convert_checkpoint", "infer_config", "load_official_checkpoint",
           "official_to_ours", "read_mindspore_checkpoint", "read_torch_checkpoint",
           "write_mindspore_checkpoint"]
