"""Small example data shipped with the package, so the first command works offline.

`pbmc_example()`: 300 cells of the 10x Genomics PBMC 4k v2 demo (CC BY 4.0), raw UMI counts of
the 14,174 genes detected in them (10x GRCh38 1.2.0 symbols), with the SoupX authors' coarse
`cell_type` annotation (T_CD4, MNP, B, T_CD8, NK, ?). Drawn with seed 0 from
`shared/data/pbmc4k_soupx` (see its SOURCE.md).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad

EXAMPLE_PATH = Path(__file__).parent / "pbmc_example.h5ad"


def pbmc_example() -> ad.AnnData:
    """300 PBMCs with raw counts and coarse cell-type labels in `obs["cell_type"]`."""
    return ad.read_h5ad(EXAMPLE_PATH)
