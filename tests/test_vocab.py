"""Gene vocabulary and identifier mapping on real gene lists."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellfm.vocab import GeneVocabulary, load_vocabulary, map_genes


def test_builtin_vocabularies_follow_official_row_order(shared_data):
    for name, file, n in [("cellfm-24k", "cellfm_gene_info.csv", 24078),
                          ("cellfm-27k", "cellfm_expand_gene_info.csv", 27855)]:
        vocab = load_vocabulary(name)
        official = pd.read_csv(shared_data / "gene_vocabularies" / file, index_col=0).index
        assert len(vocab) == n
        assert vocab.genes == list(official)
        assert vocab.id_of(official[0]) == 1 and vocab.id_of(official[-1]) == n
        assert vocab.id_of("NOT_A_GENE") == 0


def test_vocabulary_file_round_trip(tmp_path):
    vocab = load_vocabulary("cellfm-27k")
    vocab.to_file(tmp_path / "genes.txt")
    back = GeneVocabulary.from_file(tmp_path / "genes.txt", name=vocab.name)
    assert back.genes == vocab.genes and back.sha256 == vocab.sha256
    with pytest.raises(ValueError, match="twice"):
        GeneVocabulary(["A", "B", "A"])


def test_ensembl_previous_alias_and_case_are_remapped():
    vocab = load_vocabulary("cellfm-27k")
    # A1BG = ENSG00000121410; A1BG-AS1 had previous symbol NCRNA00181 and alias FLJ23569
    names = ["ENSG00000121410.12", "NCRNA00181", "cd3e", "TP53", "TP53", "XYZ_NOT_A_GENE"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = map_genes(names, vocab, min_genes=1)
    assert list(m.how) == ["ensembl", "previous", "case", "exact", "duplicate", "dropped"]
    assert m.token_ids[0] == vocab.id_of("A1BG")
    assert m.token_ids[1] == vocab.id_of("A1BG-AS1")
    assert m.token_ids[2] == vocab.id_of("CD3E")
    assert m.token_ids[4] == 0 and m.token_ids[5] == 0
    assert m.summary()["n_remapped"] == 3


def test_rename_never_takes_a_gene_present_under_its_own_name():
    vocab = load_vocabulary("cellfm-27k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = map_genes(["FLJ23569", "A1BG-AS1"], vocab, min_genes=1)  # alias first, exact second
    assert m.how[1] == "exact" and m.how[0] == "duplicate"


@pytest.mark.parametrize("rel,min_matched", [
    ("pbmc4k_soupx/pbmc4k_soupx_half.h5ad", 20000),
    ("celltypist_sample/celltypist_sample_559cells.h5ad", 19000),
    ("pbmc3k_clustifyr/pbmc3k_clustifyr_2000hvg.h5ad", 1800),
    ("pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad", 700),
    ("papalexi2021_eccite_sceptre/papalexi2021_thp1_lowmoi_299genes.h5ad", 250),
])
def test_real_datasets_map(shared_data, rel, min_matched):
    adata = ad.read_h5ad(shared_data / rel, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = map_genes(adata.var_names, load_vocabulary("cellfm-27k"))
    assert m.n_matched >= min_matched
    ids = m.token_ids[m.token_ids > 0]
    assert len(np.unique(ids)) == len(ids)  # no vocabulary gene claimed twice
    report = m.report()
    assert len(report) == adata.n_vars and set(report["how"]) <= {
        "exact", "case", "ensembl", "previous", "alias", "duplicate", "dropped"}


def test_wrong_species_or_ids_raise_with_fix():
    mouse = ["Gm" + str(i) for i in range(500)]
    with pytest.raises(ValueError, match="Ensembl gene ids"):
        map_genes(mouse, load_vocabulary("cellfm-27k"), min_genes=50)
