"""Official checkpoint layouts (MindSpore .ckpt, CellFM-torch .pt) load into our model and give
the same outputs; broken files give errors that name the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from official_annotation import write_official_annotation_checkpoint

import cellfm
from cellfm.checkpoints import (
    CheckpointFormatError,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)
from cellfm.cli import _register, app
from cellfm.config import get_preset
from cellfm.model import CellFMModule


def official_names(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Our state dict under the official MindSpore parameter names."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^value_enc\.(w1|w3|table|a)\b", r"value_enc.value_enc.\1", k)
        k = re.sub(r"(post_norm\d)\.weight$", r"\1.gamma", k)
        k = re.sub(r"(post_norm\d)\.bias$", r"\1.beta", k)
        k = re.sub(r"^st\.emb$", "ST_emb", k)
        k = re.sub(r"^st\.enc\.", "ST_enc.", k)
        m = re.match(r"(encoder\.\d+\.(?:attn|ffn))\.([qkvuo])_proj\.lora_([ab])$", k)
        if m:
            k = f"{m.group(1)}.lora_{m.group(2)}.{m.group(3).upper()}.weight"
        out[k] = v.detach().numpy().copy()
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = get_preset("tiny").replace(lora_rank=2)
    module = CellFMModule(config).eval()
    with torch.no_grad():  # non-trivial LoRA and value-encoder skip, so every key matters
        for name, p in module.named_parameters():
            if name.endswith(("lora_b", "value_enc.a", "mask_emb", "zero_emb")):
                p.normal_(0, 0.1)
    return module


def _outputs(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 27855, (3, 40), generator=g)
    vals = torch.rand(3, 40, generator=g) * 3
    tok = torch.ones(3, 40, dtype=torch.bool)
    tok[1, 25:] = False
    hidden = torch.rand(3, 40, generator=g) < 0.2
    with torch.no_grad():
        o = module(ids, vals, tok, hidden)
    return o.cell_emb, o.gene_pred, o.cell_pred


def test_mindspore_layout_round_trip(tiny, tmp_path):
    tensors = official_names(tiny.state_dict())
    tensors["moment1.gene_emb"] = np.zeros((2, 2), np.float32)  # optimizer state is skipped
    tensors["global_step"] = np.array([1234], np.int32)
    tensors["learning_rate"] = np.array(1e-6, np.float32)
    path = tmp_path / "CellFM_tiny.ckpt"
    write_mindspore_checkpoint(tensors, path)
    back = read_mindspore_checkpoint(path)
    assert set(back) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
    model = cellfm.load(path, n_heads=4)
    assert model.config.lora_rank == 2 and model.config.vocabulary == "cellfm-27k"
    for a, b in zip(_outputs(tiny), _outputs(model.module), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_heads_required_off_the_official_width(tiny, tmp_path):
    path = tmp_path / "x.ckpt"
    write_mindspore_checkpoint(official_names(tiny.state_dict()), path)
    with pytest.raises(ValueError, match="n_heads"):
        cellfm.load(path)


def test_cellfm_torch_layout(tiny, tmp_path):
    # CellFM-torch: LayerNorm weight/bias, wrapper prefix, spatial tokens our model does not use
    state = {("net." + k.replace("gamma", "weight").replace("beta", "bias")): torch.from_numpy(v)
             for k, v in official_names(tiny.state_dict()).items()}
    state["net.ST_emb"] = torch.zeros(1, 2, 32)
    torch.save({"model": state}, tmp_path / "cellfm_torch.pt")
    with pytest.warns(UserWarning, match="ST_emb"):
        model = cellfm.load(tmp_path / "cellfm_torch.pt", n_heads=4)
    for a, b in zip(_outputs(tiny), _outputs(model.module), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_st_tokens_load_and_every_dropped_tensor_is_named(tmp_path):
    torch.manual_seed(3)
    module = CellFMModule(get_preset("tiny").replace(st_tokens=True)).eval()
    with torch.no_grad():
        module.st.enc.a.fill_(0.3)
    tensors = official_names(module.state_dict())
    assert {"ST_emb", "ST_enc.w3.weight", "ST_enc.a"} <= set(tensors)
    heads = ["cluster_emb", "query.attn1.q_proj.weight", "classifier.weight", "proj.0.bias"]
    tensors.update({k: np.ones((2, 2), np.float32) for k in heads})  # official label=True heads
    tensors["moment1.gene_emb"] = np.zeros((2, 2), np.float32)  # optimizer state: not a model tensor
    path = tmp_path / "finetuned.ckpt"
    write_mindspore_checkpoint(tensors, path)
    with pytest.warns(UserWarning) as record:
        model = cellfm.load(path, n_heads=4)
    message = " ".join(str(w.message) for w in record)
    assert all(k in message for k in heads) and "ST_" not in message and "moment1" not in message
    assert model.config.st_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 27855, (2, 30), generator=g)
    vals, tok = torch.rand(2, 30, generator=g) * 3, torch.ones(2, 30, dtype=torch.bool)
    feat = torch.log1p(torch.tensor([[2.0, 3.0], [5.0, 5.0]]))
    with torch.no_grad():
        ours, theirs = module(ids, vals, tok, st_feat=feat), model.module(ids, vals, tok, st_feat=feat)
    torch.testing.assert_close(ours.cell_emb, theirs.cell_emb, rtol=0, atol=0)


def test_truncated_and_wrong_files(tiny, tmp_path):
    path = tmp_path / "t.ckpt"
    write_mindspore_checkpoint(official_names(tiny.state_dict()), path)
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated|runs past the end"):
        read_mindspore_checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointFormatError):
        read_mindspore_checkpoint(tmp_path / "junk.ckpt")
    tensors = official_names(tiny.state_dict())
    del tensors["encoder.1.ffn.o_proj.weight"]
    tensors["encoder.0.attn.q_proj.weight"] = tensors["encoder.0.attn.q_proj.weight"][:, :8]
    write_mindspore_checkpoint(tensors, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing keys \['encoder.1.ffn.o_proj.weight'\].*shape mismatches"):
        cellfm.load(tmp_path / "bad.ckpt", n_heads=4)


def test_convert_cli_writes_our_folder(tiny, tmp_path):
    from typer.testing import CliRunner

    path = tmp_path / "m.ckpt"
    write_mindspore_checkpoint(official_names(tiny.state_dict()), path)
    _register()
    result = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "out"), "--n-heads", "4"])
    assert result.exit_code == 0, result.output
    model = cellfm.load(tmp_path / "out")
    for a, b in zip(_outputs(tiny), _outputs(model.module), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _official_count(n_genes: int, d: int, n_layers: int, bins: int = 256) -> int:
    """Parameters of the official MindSpore CellFM (model.py / retention.py, label=False,
    add_zero=False), written from its definition: gene table rounded to 8 rows, cls, zero,
    ValueEncoder (FFN w1 1->256, w3 256->256, a, table 256->d, mask_emb), per RetentionLayer
    q,k,v,u,o + GLU u,v,o (bias-free d x d) and two LayerNorms, ValueDecoder w1 d x d + w2 d,
    CellwiseDecoder map d x d."""
    rows = n_genes + 1 + (-n_genes - 1) % 8
    shapes = [(rows, d), (1, 1, d), (1, 1, d), (bins, 1), (bins, bins), (1, 1), (d, bins), (1, 1, d)]
    for _ in range(n_layers):
        shapes += [(d, d)] * 8 + [(d,)] * 4
    shapes += [(d, d), (1, d), (d, d)]
    return sum(int(np.prod(s)) for s in shapes)


@pytest.mark.parametrize("preset,n_genes,layers", [("80m", 27855, 2), ("800m", 24078, 40)])
def test_preset_parameter_counts_equal_official(preset, n_genes, layers):
    with torch.device("meta"):
        module = CellFMModule(get_preset(preset))
    assert module.num_parameters() == _official_count(n_genes, 1536, layers)
    assert {"80m": 85_731_585, "800m": 797_391_105}[preset] == module.num_parameters()


def _zero_batch(seed=2):
    """Cells with zero-valued gene tokens (the official pad_zero=False layout) and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 27855, (3, 30), generator=g)
    vals = torch.rand(3, 30, generator=g) * 3
    vals[:, ::3] = 0  # a third of each cell's genes measured as zero
    tok = torch.ones(3, 30, dtype=torch.bool)
    tok[2, 20:] = False
    return ids, vals, tok


def test_pad_zero_comes_from_the_release_and_the_override_reaches_the_config(tmp_path, caplog):
    torch.manual_seed(4)
    module = CellFMModule(get_preset("tiny").replace(pad_zero=False)).eval()
    with torch.no_grad():
        module.zero_emb.normal_(0, 1.0)  # the zero embedding is used only with pad_zero=False
    path = tmp_path / "trained_without_pad_zero.ckpt"
    write_mindspore_checkpoint(official_names(module.state_dict()), path)
    with caplog.at_level("INFO", logger="cellfm.checkpoints.official"):
        default = cellfm.load(path, n_heads=4)
    assert default.config.pad_zero  # no release has these shapes: the official default Config
    assert "no official release has these shapes" in caplog.text and "pad_zero=False" in caplog.text
    asked = cellfm.load(path, n_heads=4, pad_zero=False)
    assert not asked.config.pad_zero and not asked.config.add_zero
    same = cellfm.CellFM.load(path, n_heads=4, pad_zero=False)  # one implementation
    assert same.config == asked.config
    with torch.no_grad():
        want = module(*_zero_batch()).cell_emb
        torch.testing.assert_close(asked.module(*_zero_batch()).cell_emb, want, rtol=0, atol=0)
        assert (default.module(*_zero_batch()).cell_emb - want).abs().max() > 1e-3  # it matters
    folder = asked.save(tmp_path / "folder")  # the setting travels with our folder, and is overridable there
    assert not cellfm.load(folder).config.pad_zero and cellfm.load(folder, pad_zero=True).config.pad_zero


def _shapes(rows: int, layers: int, zero_heads: bool = False) -> dict[str, torch.Tensor]:
    """A state dict of official shapes on the meta device (infer_config reads shapes only)."""
    state = {"gene_emb": torch.empty(rows, 1536, device="meta"),
             "value_enc.w1.weight": torch.empty(256, 1, device="meta")}
    for i in range(layers):
        state[f"encoder.{i}.attn.q_proj.weight"] = torch.empty(1536, 1536, device="meta")
    if zero_heads:
        state["value_dec.zero_logit.0.weight"] = torch.empty(1536, 1536, device="meta")
    return state


def test_release_settings_are_the_official_configs(caplog):
    from cellfm.checkpoints import infer_config

    with caplog.at_level("INFO", logger="cellfm.checkpoints.official"):
        c80 = infer_config(_shapes(27856, 2))
    assert (c80.pad_zero, c80.add_zero, c80.n_heads, c80.vocabulary) == (False, False, 48, "cellfm-27k")
    assert "cellfm-80m (official Config_80M)" in caplog.text
    c800 = infer_config(_shapes(24080, 40))
    assert (c800.pad_zero, c800.add_zero, c800.n_layers) == (True, False, 40)
    assert infer_config(_shapes(27856, 2), pad_zero=True).pad_zero
    assert infer_config(_shapes(24080, 40), release="cellfm-80m").pad_zero is False
    zero = infer_config(_shapes(27856, 4, zero_heads=True))  # zero heads in the file: add_zero, no pad_zero
    assert zero.add_zero and not zero.pad_zero
    with pytest.raises(TypeError, match=r"unknown model setting\(s\) \['n_head'\]"):
        infer_config(_shapes(27856, 2), n_head=8)


def test_heads_message_names_the_argument_of_each_interface(tiny, tmp_path):
    path = tmp_path / "x.ckpt"
    write_mindspore_checkpoint(official_names(tiny.state_dict()), path)
    with pytest.raises(ValueError, match=r"pass n_heads=<heads> \("):
        cellfm.CellFM.load(path)
    from typer.testing import CliRunner

    _register()
    result = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pass --n-heads HEADS (" in result.output
    result = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "out"), "--n-heads", "4",
                                      "--no-pad-zero"])
    assert result.exit_code == 0, result.output
    assert "pad_zero=False" in result.output and not cellfm.load(tmp_path / "out").config.pad_zero


def test_official_annotation_checkpoint_imports_into_encoder_and_head(tmp_path):
    """The official `Net` tensors of the annotation parity fixture, written as a MindSpore
    checkpoint, read back into CellFMModule + CellTypeHead give the official logits."""
    from cellfm.checkpoints import load_official_annotation, read_official_annotation
    from cellfm.model.cell_type_head import CellTypeHead

    path = tmp_path / "annotation_net.ckpt"
    z, ref = write_official_annotation_checkpoint(path)

    config, enc_state, head_state = read_official_annotation(path, n_heads=4)
    assert config.pad_zero and not config.add_zero and config.n_layers == 4
    encoder = CellFMModule(config).eval()
    encoder.load_state_dict(enc_state)
    n_types = head_state["cluster_emb"].shape[0]
    head = CellTypeHead(config.d_model, config.n_heads, n_types, dropout=0.0).eval()
    head.load_state_dict(head_state)
    _, encoder2, head2 = load_official_annotation(path, n_heads=4)
    t = torch.from_numpy
    tok = t(z["token_mask"])
    with torch.no_grad():
        for enc, hd in ((encoder, head), (encoder2, head2)):
            states, _ = enc.encode(t(z["gene_ids"]), t(z["values"]), tok)
            token_logits, cls_logits = hd(states, tok)
            np.testing.assert_allclose(token_logits.numpy(), ref["token_logits"], atol=4e-5, rtol=0)
            np.testing.assert_allclose(cls_logits.numpy(), ref["cls_logits"], atol=4e-5, rtol=0)
    with pytest.raises(ValueError, match="an official annotation model .*read_official_annotation"):
        cellfm.load(path, n_heads=4)


def test_convert_cli_refuses_a_full_folder_in_flag_words(tiny, tmp_path):
    from typer.testing import CliRunner

    path = tmp_path / "m.ckpt"
    write_mindspore_checkpoint(official_names(tiny.state_dict()), path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    _register()
    args = ["convert", str(path), "-o", str(tmp_path / "out"), "--n-heads", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "pass --overwrite to replace it" in result.output
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["config.json", "genes.txt", "model.safetensors"]
