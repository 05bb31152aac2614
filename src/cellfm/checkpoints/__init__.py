"""Model files as parts (config, state dict, vocabulary): our folder format, the official
MindSpore and CellFM-torch checkpoints (pretrained and annotation models) and the official
weights on the Hugging Face Hub. Nothing here builds a `cellfm.CellFM`; `CellFM.load` does, from
these parts."""

from cellfm.checkpoints.folder import (
    load_state_checked,
    read_model_folder,
    with_overrides,
    write_model_folder,
)
from cellfm.checkpoints.locate import PRETRAINED_DIR, read_model
from cellfm.checkpoints.mindspore_ckpt import (
    CheckpointFormatError,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)
from cellfm.checkpoints.official import (
    OFFICIAL_RELEASES,
    convert_checkpoint,
    infer_config,
    official_to_ours,
    read_official_checkpoint,
    read_torch_checkpoint,
)
from cellfm.checkpoints.official_annotation import load_official_annotation, read_official_annotation

__all__ = ["OFFICIAL_RELEASES", "PRETRAINED_DIR", "CheckpointFormatError", "convert_checkpoint",
           "infer_config", "load_official_annotation", "load_state_checked", "official_to_ours",
           "read_mindspore_checkpoint", "read_model", "read_model_folder", "read_official_annotation",
           "read_official_checkpoint", "read_torch_checkpoint", "with_overrides",
           "write_mindspore_checkpoint",
           "write_model_folder"]
