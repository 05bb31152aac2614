"""A SOMA experiment (TileDB-SOMA, e.g. CELLxGENE Census) as a corpus source: what to read
(`SomaQuery`), the checked selection of cells and genes (`select_cells`), and the rows of a
selection as a `CountSource` (`part_source`) that the corpus builder streams like a file.

X is read in row chunks by soma_joinid, never whole; obs columns are read per part. Genes are
matched to the vocabulary by `feature_id` (Ensembl) or `feature_name`, whichever matches more, as
for files. `tiledbsoma` (and `cellxgene_census` for the public Census) are optional extras,
imported only when a SOMA source is opened. Nothing here writes files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm.contract.counts import raw_count_problem
from cellfm.io.readers import CountSource
from cellfm.wording import arg

# obs columns kept with each cell when present (Census names); users filter and stratify by them
KEEP_OBS = ("dataset_id", "assay", "cell_type", "tissue", "tissue_general", "donor_id", "disease", "sex",
            "development_stage", "self_reported_ethnicity", "suspension_type")
CHECK_ROWS = 500  # rows read up front to tell raw counts from normalised values
INSTALL_HINT = 'pip install "cellfm[census]"'


@dataclass(frozen=True)
class SomaQuery:
    """Which cells of which SOMA experiment, and where their raw counts are.

    Give `uri` (a local folder or a tiledb:// / s3:// URI of an Experiment) or `census_version`
    (the public CELLxGENE Census, e.g. "stable" or "2025-01-30", opened with
    `cellxgene_census.open_soma`; `organism` picks its experiment). `obs_filter` is a SOMA value
    filter such as ``"is_primary_data == True and tissue_general == 'blood'"``. `obs_columns`:
    obs columns stored with each cell (default: those of `KEEP_OBS` present).
    """

    uri: str | None = None
    census_version: str | None = None
    organism: str = "homo_sapiens"
    measurement: str = "RNA"
    layer: str = "raw"
    obs_filter: str | None = None
    obs_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.uri is None) == (self.census_version is None):
            raise ValueError("give exactly one of a SOMA experiment uri and census_version")

    @property
    def where(self) -> str:
        """Where the experiment lives, in words (for messages and the report)."""
        return f"census:{self.census_version}/{self.organism}" if self.uri is None else self.uri

    @property
    def key(self) -> str:
        """The input key in the corpus manifest: experiment, measurement, layer and filter."""
        return f"soma:{self.where}#{self.measurement}/{self.layer}?{self.obs_filter or ''}"

    @property
    def name(self) -> str:
        """Short file-safe name (shard prefix and the source of each cell's split hash)."""
        base = Path(self.where.rstrip("/")).name or "soma"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:40]
        return f"soma-{stem}-{hashlib.sha1(self.key.encode()).hexdigest()[:8]}"


def is_soma_uri(text: str) -> bool:
    """True for a URI with a remote scheme or a local folder that is a TileDB group."""
    if re.match(r"^(tiledb|s3|gs|azure|https?)://", text):
        return True
    p = Path(text)
    return p.is_dir() and ((p / "__tiledb_group.tdb").exists() or (p / "__group").is_dir())


@contextmanager
def open_experiment(query: SomaQuery) -> Iterator[object]:
    """The `tiledbsoma.Experiment` of the query, open for reading."""
    try:
        import tiledbsoma
    except ImportError as err:
        raise ImportError(f"reading SOMA needs tiledbsoma: {INSTALL_HINT}") from err
    if query.census_version is not None:
        try:
            import cellxgene_census
        except ImportError as err:
            raise ImportError(f"the public Census needs cellxgene-census: {INSTALL_HINT}") from err
        with cellxgene_census.open_soma(census_version=query.census_version) as census:
            yield census["census_data"][query.organism]
        return
    if not re.match(r"^\w+://", query.uri) and not Path(query.uri).exists():
        raise ValueError(f"{query.uri}: no such SOMA experiment")
    try:
        exp = tiledbsoma.Experiment.open(query.uri)
    except (tiledbsoma.DoesNotExistError, TypeError, tiledbsoma.SOMAError) as err:
        raise ValueError(f"{query.uri} is not a SOMA experiment ({_first_line(err)})") from err
    with exp:
        yield exp


@dataclass(frozen=True)
class SomaSelection:
    """The checked cells and genes of a query (joinids sorted), as `select_cells` found them."""

    query: SomaQuery
    obs_joinids: np.ndarray  # (n_cells,) int64, sorted
    var_joinids: np.ndarray  # (n_vars,) int64
    feature_names: np.ndarray  # (n_vars,) str symbols
    feature_ids: np.ndarray | None  # (n_vars,) str Ensembl ids
    obs_columns: tuple[str, ...]  # label columns stored per cell
    id_column: str | None  # obs column of cell names ("obs_id"), else joinids name the cells

    @property
    def n_cells(self) -> int:
        return len(self.obs_joinids)

    def fingerprint(self, extra: str = "") -> str:
        """Changes when the selected cells, the genes or the query change (resume safety)."""
        h = hashlib.sha256(f"{self.query.key}|{extra}|{self.obs_columns}".encode())
        h.update(np.ascontiguousarray(self.obs_joinids, np.int64).tobytes())
        h.update("\x1f".join(map(str, self.feature_ids if self.feature_ids is not None
                                 else self.feature_names)).encode())
        return h.hexdigest()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def select_cells(query: SomaQuery) -> SomaSelection:
    """Open the experiment, check measurement, layer, filter and that the layer holds raw counts.

    Raises ValueError with one line naming the setting to change (``--measurement``,
    ``--layer``, ``--obs-filter`` on the command line).
    """
    import tiledbsoma

    with open_experiment(query) as exp:
        measurements = sorted(exp.ms.keys())
        if query.measurement not in measurements:
            raise ValueError(f"{query.where} has no measurement {query.measurement!r} (it has "
                             f"{', '.join(measurements) or 'none'}): pick one with {arg('measurement')}")
        ms = exp.ms[query.measurement]
        layers = sorted(ms.X.keys()) if "X" in ms else []
        if query.layer not in layers:
            raise ValueError(f"measurement {query.measurement!r} of {query.where} has no X layer "
                             f"{query.layer!r} (it has {', '.join(layers) or 'none'}): pick the raw "
                             f"counts with {arg('layer')}")
        obs_names = list(exp.obs.schema.names)
        try:
            obs_query = tiledbsoma.AxisQuery(value_filter=query.obs_filter) if query.obs_filter \
                else tiledbsoma.AxisQuery()
            with exp.axis_query(query.measurement, obs_query=obs_query) as q:
                joinids = np.sort(q.obs_joinids().to_numpy().astype(np.int64))
        except (tiledbsoma.SOMAError, ValueError, TypeError) as err:
            raise ValueError(f"{arg('obs_filter')} {query.obs_filter!r} cannot be read: {_first_line(err)} "
                             f"(obs columns: {', '.join(c for c in obs_names if c != 'soma_joinid')})"
                             ) from err
        if len(joinids) == 0:
            raise ValueError(f"{arg('obs_filter')} {query.obs_filter!r} matches no cells of {query.where}")
        var = ms.var.read().concat().to_pandas()
        names = _var_column(var, ("feature_name", "gene_symbol", "var_id", "gene_ids"))
        ids = _var_column(var, ("feature_id", "gene_id", "ensembl_id"), required=False)
        wanted = query.obs_columns if query.obs_columns is not None else KEEP_OBS
        missing = [c for c in (query.obs_columns or ()) if c not in obs_names]
        if missing:
            raise ValueError(f"obs has no column {missing[0]!r}; it has {', '.join(obs_names)}")
        sel = SomaSelection(query, joinids, var["soma_joinid"].to_numpy(np.int64), names, ids,
                            tuple(c for c in wanted if c in obs_names),
                            "obs_id" if "obs_id" in obs_names else None)
        first = read_rows(ms.X[query.layer], sel.obs_joinids[:CHECK_ROWS], sel.var_joinids)
    why = raw_count_problem(first)
    if why is not None:
        raise ValueError(f"X layer {query.layer!r} of measurement {query.measurement!r} does not hold raw "
                         f"counts ({why}): pick the raw-count layer with {arg('layer')} (layers: "
                         f"{', '.join(layers)})")
    return sel


def _var_column(var: pd.DataFrame, names: tuple[str, ...], required: bool = True) -> np.ndarray | None:
    for n in names:
        if n in var.columns:
            return var[n].astype(str).to_numpy(dtype=object)
    if required:
        raise ValueError(f"var has none of the gene columns {names} (it has {', '.join(var.columns)})")
    return None


def read_rows(X, obs_joinids: np.ndarray, var_joinids: np.ndarray) -> sp.csr_matrix:
    """Rows `obs_joinids` (sorted) of a SOMA sparse array as CSR (len(obs_joinids), len(var_joinids)),
    columns in the order of `var_joinids`."""
    shape = (len(obs_joinids), len(var_joinids))
    if len(obs_joinids) == 0:
        return sp.csr_matrix(shape, dtype=np.float64)
    col_of = np.full(int(var_joinids.max()) + 1, -1, np.int64)
    col_of[var_joinids] = np.arange(len(var_joinids))
    rows, cols, vals = [], [], []
    for t in X.read(coords=(obs_joinids,)).tables():
        d0 = t["soma_dim_0"].to_numpy()
        d1 = t["soma_dim_1"].to_numpy()
        c = col_of[np.minimum(d1, len(col_of) - 1)]
        keep = (d1 < len(col_of)) & (c >= 0)
        rows.append(np.searchsorted(obs_joinids, d0[keep]))
        cols.append(c[keep])
        vals.append(t["soma_data"].to_numpy()[keep].astype(np.float64))
    if not rows:
        return sp.csr_matrix(shape, dtype=np.float64)
    m = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape)
    return m.tocsr()


def part_source(sel: SomaSelection, a: int, b: int) -> tuple[CountSource, np.ndarray]:
    """Cells a..b of the selection as a CountSource (obs of the part read now, X streamed in
    chunks when iterated), and their soma_joinids."""
    ids = sel.obs_joinids[a:b]
    q = sel.query
    with open_experiment(q) as exp:
        cols = ["soma_joinid", *sel.obs_columns] + ([sel.id_column] if sel.id_column else [])
        obs = (exp.obs.read(coords=(ids,), column_names=list(dict.fromkeys(cols))).concat().to_pandas()
               .set_index("soma_joinid").reindex(ids))
    cell_ids = (obs[sel.id_column].astype(str).to_numpy(dtype=object) if sel.id_column
                else ids.astype(str).astype(object))
    labels = pd.DataFrame({c: obs[c].astype(str).to_numpy(dtype=object) for c in sel.obs_columns})

    def chunks(size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        with open_experiment(q) as exp2:
            X = exp2.ms[q.measurement].X[q.layer]
            for s in range(0, len(ids), size):
                yield s, read_rows(X, ids[s : s + size], sel.var_joinids)

    src = CountSource(Path(q.where), "soma", sel.feature_names, cell_ids, chunks, var_ids=sel.feature_ids,
                      obs=labels, counts_from=f"{q.measurement}/X/{q.layer}")
    return src, ids
