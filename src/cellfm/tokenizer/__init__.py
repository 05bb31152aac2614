"""From raw counts to model tokens, as the official CellFM pipeline does it. Which matrix and which
genes are read is settled before, by `cellfm.contract`."""

from cellfm.tokenizer.batches import cell_rng, chunk_batches, tokenize_chunk
from cellfm.tokenizer.tokenize import (
           collate_cells,
           lognorm,
           mask_values,
           normalise,
           scale_library,
           tokenize_cell,
)

__all__ = ["cell_rng", "chunk_batches", "collate_cells", "lognorm", "mask_values", "normalise",
           "scale_library",
           "tokenize_cell", "tokenize_chunk"]
