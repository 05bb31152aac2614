"""Reverse perturbation: candidate sets, tie handling, and the combination path (pairs, additive
baseline) on a simulated combinatorial screen whose ground truth is known."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from cellfm.tasks.perturbation_reverse import (
    additive_pairs,
    candidate_conditions,
    rank_hits,
    retrieval_profiles,
    reverse_markdown,
    summarise_reverse,
    targets_of,
)


def test_candidates_are_every_target_and_pairs_only_when_the_screen_has_pairs():
    singles = ["STAT1+ctrl", "JAK2+ctrl", "IFNGR1+ctrl"]
    assert candidate_conditions(singles) == ["IFNGR1+ctrl", "JAK2+ctrl", "STAT1+ctrl"]
    with_pair = candidate_conditions(singles + ["STAT1+JAK2"])
    assert len(with_pair) == 3 + 3 and "JAK2+STAT1" in with_pair
    assert targets_of("STAT1+JAK2") == targets_of("JAK2+STAT1") == ("JAK2", "STAT1")


def test_a_method_that_cannot_tell_candidates_apart_scores_chance():
    rng = np.random.default_rng(0)
    cands = [f"G{i}+ctrl" for i in range(20)]
    observed = pd.DataFrame(rng.normal(size=(5, 8)), index=cands[:5])
    same = pd.DataFrame(np.ones((20, 8)), index=cands)
    hits = rank_hits(observed, same)
    assert np.allclose(hits.top1, 1 / 20) and np.allclose(hits.top10, 10 / 20)
    assert (hits.n_candidates == 20).all()
    exact = pd.DataFrame(rng.normal(size=(20, 8)), index=cands)
    assert (rank_hits(exact.iloc[:5], exact).top1 == 1).all()
    with pytest.raises(ValueError, match="not among the candidate"):
        rank_hits(pd.DataFrame(np.zeros((1, 8)), index=["NEW+ctrl"]), exact)


@pytest.fixture(scope="module")
def combinatorial_screen():
    """12 genes, 60 measured genes; single effects random sparse vectors, pair effect = sum of
    its singles + a small interaction: the additive model is close to the truth."""
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(12)]
    ctrl = rng.gamma(2.0, 0.5, size=60)
    single = {g: rng.normal(size=60) * (rng.random(60) < 0.3) for g in genes}
    profiles = {f"{g}+ctrl": ctrl + single[g] + rng.normal(scale=0.02, size=60) for g in genes}
    for a, b in itertools.combinations(genes, 2):
        profiles["+".join(sorted((a, b)))] = ctrl + single[a] + single[b] + rng.normal(scale=0.1, size=60)
    return pd.DataFrame(profiles).T, ctrl


def test_additive_baseline_names_unseen_pairs_from_trained_singles(combinatorial_screen):
    profiles, ctrl = combinatorial_screen
    pairs = [c for c in profiles.index if len(targets_of(c)) == 2]
    rng = np.random.default_rng(2)
    test = list(rng.choice(pairs, 15, replace=False))
    train = profiles.drop(index=test)
    cands = candidate_conditions(list(profiles.index))
    assert len(cands) == 12 + 66
    retrieval = retrieval_profiles(train, ctrl, cands)
    assert retrieval.loc[test].notna().all().all()  # unseen pairs: additive from trained singles
    np.testing.assert_allclose(retrieval.loc[test[0]], train.loc[f"{targets_of(test[0])[0]}+ctrl"]
                               + train.loc[f"{targets_of(test[0])[1]}+ctrl"] - ctrl)
    hits = rank_hits(profiles.loc[test], retrieval)
    assert hits.top1.mean() >= 0.9  # the truth is additive up to small noise
    # a single-perturbation predictor ranks pairs through the same additive rule
    singles = train.loc[[c for c in train.index if len(targets_of(c)) == 1]]
    from_singles = additive_pairs(singles, ctrl, cands)
    assert rank_hits(profiles.loc[test], from_singles).top3.mean() >= 0.9
    # the mean of the training profiles cannot tell them apart: chance
    mean = pd.DataFrame(np.tile(train.mean().to_numpy(), (len(cands), 1)), index=cands)
    chance = rank_hits(profiles.loc[test], mean)
    assert np.allclose(chance.top10, 10 / len(cands))
    per = pd.concat([hits.assign(method="retrieval", seed=1), chance.assign(method="mean", seed=1)])
    table = summarise_reverse(per)
    assert list(table.method) == ["retrieval", "mean"]
    assert table.chance_top1.iloc[0] == pytest.approx(1 / 78)
    assert "chance (78 candidates)" in reverse_markdown(table)


def test_retrieval_cannot_name_a_single_it_never_saw(combinatorial_screen):
    profiles, ctrl = combinatorial_screen
    singles = profiles.loc[[c for c in profiles.index if len(targets_of(c)) == 1]]
    train, test = singles.iloc[:9], singles.iloc[9:]
    cands = candidate_conditions(list(singles.index))
    hits = rank_hits(test, retrieval_profiles(train, ctrl, cands))
    assert (hits.top1 == 0).all() and (hits.top3 == 0).all()
    assert (hits["rank"] > 9).all()  # unseen singles rank after every trained one
