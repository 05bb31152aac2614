"""Files at the edges of the data path: count files in (`read`: h5ad, 10x, loom; `readers`: the
format readers shared with `corpus build`; `corpus`: a built corpus read by rows) and results out
(`write`: the atomic writer; `stream_writer`: embeddings that arrive in chunks).

Nothing here judges counts or runs a model. Submodules are imported on use (no eager imports), so
that the corpus readers and the contract can import each other's low-level pieces."""
