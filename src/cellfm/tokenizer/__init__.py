"""From raw counts to model tokens, as the official CellFM pipeline does it."""

from cellfm.tokenizer.batches import chunk_batches, count_matrix, iter_token_batches, tokenize_chunk
from cellfm.tokenizer.checks import check_counts, iter_row_chunks
from cellfm.tokenizer.tokenize import collate_cells, mask_values, normalise, scale_library, tokenize_cell

__all__ = ["check_counts", "chunk_batches", "collate_cells", "count_matrix", "iter_row_chunks",
           "iter_token_batches", "mask_values", "normalise", "scale_library", "tokenize_cell",
           "tokenize_chunk"]
