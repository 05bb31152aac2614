"""The evaluation harness: CellFM next to classical baselines on fixed, real data sets.

Apart from the user tools in `cellfm.tasks`, which it runs and measures. `data` names the data sets
and finds them only through a `data_dir` argument or CELLFM_DATA_DIR; `gene_labels` reads the
gene-level labels; `baselines` and `integration_baselines` are the methods CellFM is compared
against; `pbmc_batches` builds the integration benchmark's cells; `cell_identity` probes the frozen
CLS; `report` (with `sections`, `markdown`, `plots`) writes the Markdown report of
`cellfm evaluate`. Import the modules themselves: this package imports nothing on its own.
"""
