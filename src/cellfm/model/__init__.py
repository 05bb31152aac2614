"""Plain torch.nn modules of CellFM; they know tensors only."""

from cellfm.model.loss import pretraining_loss
from cellfm.model.module import CellFMModule, ModelOutput

__all__ = ["CellFMModule", "ModelOutput", "pretraining_loss"]
