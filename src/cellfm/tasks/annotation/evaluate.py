"""Scores of the annotator on labelled query cells, beside two baselines fitted on the same
reference: logistic regression on PCA of log counts (HVG + PCA) and logistic regression on the
same model's CLS embeddings. Results are typed (`AnnotationEvaluation`), not dicts.

Scores are given three ways: closed set (every cell gets its most likely type, as the baselines
do), all cells with "unknown" counted as wrong, and the accepted cells only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from cellfm.cellfm import CellFM
from cellfm.contract.setup import setup_cells
from cellfm.embedding.engine import embed_cells
from cellfm.evaluation.baselines import pca_logistic_regression
from cellfm.tasks.annotation.annotator import UNKNOWN, CellTypeAnnotator
from cellfm.tasks.annotation.config import AnnotatorConfig
from cellfm.tasks.annotation.reference import checked_labels

BASELINE_PCA = "logreg PCA of log counts"
BASELINE_CLS = "logreg CellFM CLS"


@dataclass
class AnnotationEvaluation:
    """`table`: one row per method (method, accuracy, macro_f1 closed set; for the annotator also
    *_all (unknown = wrong) and *_accepted); `predictions`: closed-set labels per method."""

    table: pd.DataFrame
    y_true: np.ndarray
    predictions: dict[str, np.ndarray]
    rejected_fraction: float
    temperature: float
    head: str
    head_selection: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stops: list[dict] = field(default_factory=list)
    n_train: int = 0
    n_test: int = 0

    def score(self, method: str, metric: str = "macro_f1") -> float:
        return float(self.table.set_index("method").loc[method, metric])


def _scores(y: np.ndarray, pred: np.ndarray) -> dict:
    return {"accuracy": accuracy_score(y, pred), "macro_f1": f1_score(y, pred, average="macro")}


def annotator_scores(y: np.ndarray, label: np.ndarray, closed: np.ndarray) -> dict:
    """Closed-set scores, scores over all cells with "unknown" wrong, and over accepted cells."""
    accepted = label != UNKNOWN
    out = _scores(y, closed)
    out |= {f"{k}_all": v for k, v in _scores(y, label).items()}
    out |= {f"{k}_accepted": v for k, v in (_scores(y[accepted], label[accepted]) if accepted.any()
                                           else {"accuracy": np.nan, "macro_f1": np.nan}).items()}
    return out | {"unknown_share": float(1 - accepted.mean())}


def cls_logistic_regression(model: CellFM, train: ad.AnnData, y_train: np.ndarray, test: ad.AnnData,
                            seed: int = 0, **read) -> np.ndarray:
    """Labels of `test` by logistic regression on standardised CLS embeddings of `train`."""
    emb = [embed_cells(setup_cells(a, model, empty="zero", seed=seed, **read), model, progress=False)
           for a in (train, test)]
    scaler = StandardScaler().fit(emb[0])
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    return clf.fit(scaler.transform(emb[0]), y_train).predict(scaler.transform(emb[1]))


def _counts(adata: ad.AnnData, layer: str | None, use_raw: bool):
    return adata.raw.X if use_raw else (adata.X if layer is None else adata.layers[layer])


def _shared_genes(ref: ad.AnnData, query: ad.AnnData, use_raw: bool) -> tuple[ad.AnnData, ad.AnnData]:
    """Both restricted to the genes both measure, in the reference's order (PCA needs one gene
    space); unchanged when the gene lists already agree."""
    genes = [(a.raw.var_names if use_raw else a.var_names) for a in (ref, query)]
    if genes[0].equals(genes[1]):
        return ref, query
    shared = genes[0][genes[0].isin(genes[1])]
    if len(shared) == 0:
        raise ValueError("reference and query share no gene name: the PCA baseline needs common genes")
    if use_raw:
        var = pd.DataFrame(index=shared)
        return tuple(ad.AnnData(a.raw[:, shared].X, obs=a.obs, var=var) for a in (ref, query))
    return ref[:, shared], query[:, shared]


def compare_on_query(
    ann: CellTypeAnnotator,
    reference: ad.AnnData,
    query: ad.AnnData,
    truth_key: str,
    *,
    key_added: str = "cellfm",
    layer: str | None = None,
    use_raw: bool = False,
) -> pd.DataFrame:
    """The annotator's labels in `query.obs` (from `predict`) against `obs[truth_key]`, beside
    both baselines fitted on the labelled cells of `reference` (the annotator's label key). Query
    cells whose truth is unlabelled are left out."""
    labels = reference.obs[ann.settings["label_key"]].astype(str)
    keep = labels.isin(ann.classes).to_numpy()  # the cells and classes the annotator learned
    ref, y_ref = reference[keep], labels[keep].to_numpy()
    truth = checked_labels(query, truth_key, 1)
    q = truth.notna().to_numpy()
    y = truth[q].astype(str).to_numpy()
    label = query.obs[f"{key_added}_label"].astype(str).to_numpy()[q]
    closed = query.obs[f"{key_added}_label_closed_set"].astype(str).to_numpy()[q]
    name = f"CellFM annotator ({ann.settings.get('head', '')})"
    rows = [{"method": name, **annotator_scores(y, label, closed)}]
    ref_pca, query_pca = _shared_genes(ref, query[q], use_raw)
    pca = pca_logistic_regression(_counts(ref_pca, layer, use_raw), y_ref, _counts(query_pca, layer, use_raw),
                                  seed=ann.config.seed)
    cls = cls_logistic_regression(ann.encoder, ref, y_ref, query[q], ann.config.seed, layer=layer,
                                  use_raw=use_raw)
    rows += [{"method": BASELINE_PCA, **_scores(y, pca)}, {"method": BASELINE_CLS, **_scores(y, cls)}]
    return pd.DataFrame(rows)


def evaluate_annotation(
    adata: ad.AnnData,
    label_key: str,
    model: CellFM | str,
    config: AnnotatorConfig | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> AnnotationEvaluation:
    """Stratified held-out split of `adata`; the annotator and both baselines fitted on the rest."""
    config = config or AnnotatorConfig(seed=seed)
    labels = checked_labels(adata, label_key, config.min_cells_per_class)
    keep = np.flatnonzero(labels.notna().to_numpy())
    y = labels.iloc[keep].astype(str).to_numpy()
    tr, te = train_test_split(keep, test_size=test_fraction, stratify=y, random_state=seed)
    train, test = adata[np.sort(tr)].copy(), adata[np.sort(te)].copy()
    ann = CellTypeAnnotator(model, config).fit(train, label_key)
    ann.predict(test)
    table = compare_on_query(ann, train, test, label_key)
    y_te = labels.iloc[np.sort(te)].astype(str).to_numpy()
    name = table["method"].iloc[0]
    preds = {name: test.obs["cellfm_label_closed_set"].astype(str).to_numpy()}
    return AnnotationEvaluation(
        table=table, y_true=y_te, predictions=preds,
        rejected_fraction=test.uns["cellfm_annotation"]["rejected_fraction"], temperature=ann.temperature,
        head=ann.settings["head"], head_selection=ann.settings["head_selection"], history=ann.history,
        stops=ann.stops, n_train=len(tr), n_test=len(te),
    )
