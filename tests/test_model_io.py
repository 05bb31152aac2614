"""`CellFM` folder save/load: exact round trip, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from cellfm import CellFM, load


@pytest.fixture(scope="module")
def tiny() -> CellFM:
    torch.manual_seed(0)
    return CellFM.from_preset("tiny")


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 27855, (3, 50), generator=g)
    vals = torch.rand(3, 50, generator=g) * 3
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, 30:] = False
    return ids, vals, mask


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "genes.txt"}
    again = load(folder)
    assert again.config == tiny.config
    assert again.vocab.genes == tiny.vocab.genes
    a, b = tiny.module.state_dict(), again.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.inference_mode():
        torch.testing.assert_close(again.module(*batch()).cell_emb, tiny.module(*batch()).cell_emb,
                                   atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny.save(folder)
    assert CellFM.load(folder, dropout=0.0).config == tiny.config.replace(dropout=0.0)  # same as load
    with pytest.raises(TypeError, match=r"unknown model setting\(s\) \['heads'\]"):
        load(folder, heads=2)


def test_save_over_a_folder_replaces_it_whole(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m")
    (folder / "stale.txt").write_text("from an older save")
    other = CellFM.from_preset("tiny")
    other.save(folder, overwrite=True)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "genes.txt"}
    assert torch.equal(load(folder).module.gene_emb, other.module.gene_emb)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left beside it


def test_truncated_safetensors_gives_clear_error(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(folder)


def test_missing_files_and_wrong_shapes_are_named(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load(folder)
    folder = tiny.save(tmp_path / "m2")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["d_model"] = 64
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape mismatches"):
        load(folder)
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        load(tmp_path / "nothing_here")


def test_800m_preset_on_meta_device():
    model = CellFM.from_preset("800m", device="meta")
    assert model.device.type == "meta"
    assert 7.5e8 < model.num_parameters() < 8.5e8
    assert len(model.vocab) == model.config.n_genes == 24078
