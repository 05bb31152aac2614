"""Open-set rule of the annotator: a query cell is "unknown" when its calibrated confidence is
below a threshold or its CLS embedding lies far from every reference type centroid.

Both cut-offs are calibrated on held-out reference cells (the validation split, which the head
never trained on) so that at most `max_rejected` (5 %) of a query from the reference's own
distribution is rejected: cells of the reference's own tissue must pass, otherwise the rule says
"unknown" to much of a normal query. Cut-offs that reject exactly 5 % of a few hundred validation
cells reject about 5 % of such a query, above it about half of the time; so the validation cells are
held to a lower share (`calibration_target`) whose one-sided 95 % binomial upper bound is
`max_rejected`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OpenSetRule:
    emb_mean: np.ndarray  # (D,) standardisation of the CLS embeddings
    emb_std: np.ndarray  # (D,)
    centroids: np.ndarray  # (C, D) per-type centroids of the training cells, standardised space
    distance_cutoff: float  # reject above this distance to the nearest centroid
    threshold: float  # reject below this calibrated confidence
    reference_rejected: float  # share of held-out reference cells this rule rejects

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """Distance of each cell (N, D) to its nearest type centroid, in units of the cut-off."""
        z = (emb - self.emb_mean) / self.emb_std
        d = ((z[:, None, :] - self.centroids[None]) ** 2).sum(-1)  # (N, C)
        return np.sqrt(d.min(1)) / self.distance_cutoff

    def rejects(self, confidence: np.ndarray, emb: np.ndarray) -> np.ndarray:
        return (confidence < self.threshold) | (self.distance(emb) > 1.0)


def calibration_target(max_rejected: float, n: int, z: float = 1.645) -> float:
    """The largest share r <= max_rejected of `n` validation cells with r + z sd(r) <= max_rejected
    (sd of a binomial share): rejecting r of them keeps a new query's share under `max_rejected`
    with about 95 % confidence. E.g. 5 %: 3.6 % of 500 cells, 2.4 % of 100."""
    if n <= 0 or max_rejected <= 0:
        return max_rejected
    r = np.linspace(0.0, max_rejected, 501)
    ok = r + z * np.sqrt(r * (1 - r) / n) <= max_rejected
    return float(r[ok].max())


def calibrate_open_set(
    emb_train: np.ndarray,
    y_train: np.ndarray,
    n_classes: int,
    emb_val: np.ndarray,
    conf_val: np.ndarray,
    threshold: float,
    max_rejected: float = 0.05,
) -> OpenSetRule:
    """Centroids from the training cells; with r = `calibration_target(max_rejected, n held-out)`,
    the distance cut-off at the (1 - r / 2) quantile of the held-out cells' distances and the
    confidence threshold lowered from `threshold` only as far as needed for the two rules together
    to reject at most r of the held-out cells."""
    target = calibration_target(max_rejected, len(conf_val))
    mean, std = emb_train.mean(0), emb_train.std(0) + 1e-6
    z = (emb_train - mean) / std
    centroids = np.stack(
        [z[y_train == c].mean(0) if (y_train == c).any() else np.zeros(z.shape[1]) for c in range(n_classes)]
    )
    rule = OpenSetRule(mean, std, centroids, 1.0, threshold, 0.0)
    raw = rule.distance(emb_val)
    rule.distance_cutoff = float(max(np.quantile(raw, 1 - target / 2), 1e-6))
    far = raw > rule.distance_cutoff
    budget = int(np.floor(target * len(conf_val)))
    low = np.sort(conf_val[~far])  # confidences of the cells the distance rule keeps
    allowed = max(budget - int(far.sum()), 0)  # how many of those may fall below the threshold
    if allowed < len(low) and (low < threshold).sum() > allowed:
        rule.threshold = float(low[allowed])  # exactly `allowed` cells lie strictly below it
    rule.reference_rejected = float(rule.rejects(conf_val, emb_val).mean())
    return rule
