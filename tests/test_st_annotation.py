"""Cell type annotation with ST tokens (`fit(..., st_tokens=True)`, `cellfm annotate fit
--st-tokens`) on real pbmc3k cells: the frozen encoder sees the cell's total, lora / full train
the ST weights (new ones when the model has none, reported), and they are saved with the annotator."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import cellfm
from cellfm.contract import setup_cells
from cellfm.tasks.annotation import AnnotatorConfig, CellTypeAnnotator
from cellfm.tasks.annotation.heads import new_head
from cellfm.tasks.annotation.reference import token_batches, trainable_copy
from cellfm.tasks.annotation.states import TokenStates
from cellfm.tasks.annotation.training import encoder_epoch_fn

LABEL = "classified"


@pytest.fixture(scope="module")
def ref(shared_data):
    from cellfm.evaluation.data import load_benchmark

    adata = load_benchmark("pbmc3k", shared_data)
    rng = np.random.default_rng(0)
    return adata[np.sort(rng.choice(adata.n_obs, 64, replace=False))].copy()


@pytest.fixture(scope="module")
def st_model() -> cellfm.CellFM:
    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny", st_tokens=True)


@pytest.fixture(scope="module")
def plain_model() -> cellfm.CellFM:
    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny")


def fit(ref, model, **kw) -> CellTypeAnnotator:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropping")  # rare pbmc3k classes in 64 cells
        config = AnnotatorConfig(val_fraction=0.2, max_epochs=2, progress=False, device="cpu", **kw)
        return CellTypeAnnotator(model, config).fit(ref, LABEL)


def test_frozen_annotation_reads_the_st_encoder_and_round_trips(ref, st_model, tmp_path):
    dev = torch.device("cpu")
    cells = setup_cells(ref, st_model, empty="zero")
    with_st = TokenStates.compute(cells, st_model, dev, progress=False, st_tokens=True)
    without = TokenStates.compute(cells, st_model, dev, progress=False)
    # the cached CLS is the embedding `embed(..., st_tokens=True)` gives; tokens are the gene rows only
    emb = cellfm.embed(ref, st_model, copy=True, st_tokens=True, progress=False).obsm["X_cellfm"]
    np.testing.assert_allclose(with_st.cls, emb, atol=2e-5)
    assert np.array_equal(with_st.lengths, without.lengths)
    assert np.abs(with_st.cls - without.cls).max(1).min() > 1e-3

    ann = fit(ref, st_model, st_tokens=True)
    assert ann.settings["st_tokens"] and ann.settings["st_weights"] == "checkpoint"
    assert ann.encoder is st_model  # frozen: the model itself, ST weights unchanged
    probs = ann.predict_proba(ref)
    back = CellTypeAnnotator.load(ann.save(tmp_path / "ann"))
    assert back.settings["st_tokens"] and back.encoder.config.st_tokens
    np.testing.assert_allclose(back.predict_proba(ref).to_numpy(), probs.to_numpy(), atol=1e-5)


def test_frozen_st_tokens_refuse_a_model_without_st_weights(ref, plain_model):
    with pytest.raises(ValueError, match=r"st_tokens=True with mode='frozen' needs a model with ST-token "
                                         r"weights.*mode='lora' or mode='full'"):
        fit(ref, plain_model, st_tokens=True)


def test_lora_creates_reports_and_saves_new_st_weights(ref, plain_model, tmp_path):
    with pytest.warns(UserWarning, match=r"no ST-token weights, so new ones were created"):
        ann = fit(ref, plain_model, mode="lora", lora_rank=2, head="cls_mlp", st_tokens=True)
    assert ann.settings["st_weights"] == "new"
    assert plain_model.module.st is None  # the given model is untouched
    assert ann.encoder.config.st_tokens and ann.encoder.config.lora_rank == 0  # merged
    back = CellTypeAnnotator.load(ann.save(tmp_path / "ann"))
    assert back.settings["st_weights"] == "new"
    for name, value in ann.encoder.module.st.state_dict().items():
        assert torch.equal(back.encoder.module.st.state_dict()[name], value)
    query = ref[:16]
    np.testing.assert_allclose(back.predict_proba(query).to_numpy(), ann.predict_proba(query).to_numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_st_weights_train_with_the_encoder(ref, st_model, mode):
    enc = trainable_copy(st_model, mode, 2, train_st=True)
    trainable = {n for n, p in enc.module.named_parameters() if p.requires_grad}
    assert {n for n, _ in enc.module.named_parameters() if n.startswith("st.")} <= trainable
    if mode == "lora":
        assert all("lora_" in n or n.startswith("st.") for n in trainable)
    y = torch.from_numpy(np.unique(ref.obs[LABEL].astype(str), return_inverse=True)[1]).long()
    torch.manual_seed(0)
    head = new_head("official", enc.config, int(y.max()) + 1)
    before = {k: v.clone() for k, v in enc.module.st.state_dict().items()}
    batches = token_batches(ref, enc, 16, 0)
    epoch, _ = encoder_epoch_fn(enc.module, head, batches, batches[:1], y, y, None, 1e-3, 1e-3,
                                torch.device("cpu"), 0, st_tokens=True)
    epoch()
    for name, value in enc.module.st.state_dict().items():
        assert not torch.equal(value, before[name]), f"st.{name} did not train"
    for name, value in st_model.module.st.state_dict().items():
        assert torch.equal(value, before[name])  # the base model is untouched


def test_cli_annotate_fit_st_tokens(ref, tmp_path):
    import typer
    from typer.testing import CliRunner

    from cellfm.cli.annotate import annotate_app

    app = typer.Typer()
    app.add_typer(annotate_app, name="annotate")
    ref.write_h5ad(tmp_path / "ref.h5ad")
    runner = CliRunner()
    base = ["annotate", "fit", str(tmp_path / "ref.h5ad"), "--label-key", LABEL, "--model", "preset:tiny",
            "--max-epochs", "1", "--threads", "1", "--min-cells-per-class", "3", "--st-tokens"]
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "frozen")])
    assert bad.exit_code == 2, bad.output
    lines = [line for line in bad.output.splitlines() if line.startswith("error")]  # one error line
    assert len(lines) == 1 and re.match(r"error: --model preset:tiny: --st-tokens with --mode frozen needs a "
                                        r"model with ST-token weights.*--mode lora or --mode full", lines[0])
    good = runner.invoke(app, [*base, "--mode", "lora", "--lora-rank", "2", "-o", str(tmp_path / "lora")])
    assert good.exit_code == 0, good.output
    assert "ST tokens (new weights)" in good.output
    ann = CellTypeAnnotator.load(tmp_path / "lora")
    assert ann.settings["st_tokens"] and ann.encoder.config.st_tokens
