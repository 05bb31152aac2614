"""Derive the package's compact gene-identifier table from public reference tables.

Writes src/cellfm/vocab/data/gene_aliases.tsv.gz with columns identifier, symbol, kind where kind
is one of ensembl (Ensembl gene id -> approved/reference symbol), previous, alias (HGNC previous
and alias symbols -> approved symbol). Inputs (see shared/data/gene_vocabularies/SOURCE.md): the
HGNC complete table, GENCODE v44 id2name and the Ensembl 109 table Geneformer uses.

    python scripts/build_gene_tables.py ../shared/data/gene_vocabularies
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "src" / "cellfm" / "vocab" / "data" / "gene_aliases.tsv.gz"


def main(src: Path) -> None:
    hgnc = pd.read_csv(src / "hgnc_complete_GeneSymbolRef_upd0731.csv.gz", dtype=str)
    hgnc = hgnc[hgnc["Status"] == "Approved"]
    parts = []
    for col, kind in [("Previous symbol", "previous"), ("Alias symbol", "alias"),
                      ("Ensembl gene ID", "ensembl")]:
        t = hgnc[[col, "Approved symbol"]].dropna()
        t.columns = ["identifier", "symbol"]
        t["kind"] = kind
        parts.append(t)
    gencode = pd.read_csv(src / "gencode_v44_gene_id2name.csv", header=None, names=["identifier", "symbol"])
    ens109 = pd.read_csv(src / "geneformer_gene_info_table_ensembl109.csv", usecols=[0, 1])
    ens109.columns = ["identifier", "symbol"]
    for t in (gencode, ens109):
        t = t.dropna().copy()
        t["identifier"] = t["identifier"].str.split(".").str[0]
        t["kind"] = "ensembl"
        parts.append(t)
    table = pd.concat(parts, ignore_index=True)
    table["identifier"] = table["identifier"].str.strip()
    table = table[table["identifier"] != table["symbol"]].drop_duplicates()
    table.to_csv(OUT, sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    print(f"wrote {OUT} ({len(table)} rows, {OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/gene_vocabularies"))
