"""`manifest.json`: what a corpus folder holds (shards, cell counts, checksums, vocabulary, filters)
and which inputs produced it, so a re-run adds only new inputs and a loader can check what it reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from cellfm.corpus.shards import file_sha256
from cellfm.io.write import write_text

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_COLUMNS = ["input", "format", "status", "reason", "counts_from", "cells_read", "cells_kept",
                  "dropped_too_few_genes", "dropped_too_many_genes", "dropped_empty",
                  "genes_in_file", "genes_matched", "shards"]


@dataclass
class ShardInfo:
    file: str  # name inside the corpus folder
    n_cells: int
    sha256: str
    source: str  # input path it came from


@dataclass
class CorpusManifest:
    """Contents of a corpus folder. `shards` are in corpus order: global cell index i is row
    i - offset(s) of shard s, where offset(s) sums the cells of the shards before it."""

    vocabulary: dict  # {"name", "n_genes", "sha256"}
    filters: dict  # {"min_genes", "max_genes"}
    shards: list[ShardInfo] = field(default_factory=list)
    inputs: dict[str, dict] = field(default_factory=dict)  # input path -> {size, mtime_ns, report}
    format_version: int = FORMAT_VERSION
    gene_id_dtype: str = "uint16"
    counts: str = "library-scaled: round(count / max(1, total_all_genes / 1e5)), uint32"

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.shards)

    @property
    def report(self) -> pd.DataFrame:
        """One row per input ever given (latest attempt), see `REPORT_COLUMNS`."""
        rows = [v["report"] for v in self.inputs.values()]
        return pd.DataFrame(rows, columns=REPORT_COLUMNS)

    def to_json(self) -> dict:
        d = asdict(self)
        d["n_cells"] = self.n_cells
        return d

    def save(self, folder: Path) -> None:
        """Atomic write (temporary file + rename), so readers never see half a manifest."""
        write_text(Path(folder) / MANIFEST_NAME, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> CorpusManifest:
        d = json.loads((Path(folder) / MANIFEST_NAME).read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: corpus format {d.get('format_version')} != {FORMAT_VERSION}")
        d.pop("n_cells", None)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)

    def verify(self, folder: Path) -> list[str]:
        """Shards whose file is missing or whose sha256 differs from the manifest."""
        bad = []
        for s in self.shards:
            p = Path(folder) / s.file
            if not p.exists() or file_sha256(p) != s.sha256:
                bad.append(s.file)
        return bad
