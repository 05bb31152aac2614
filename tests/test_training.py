"""Pretraining on a real corpus: the loss falls, the recipe matches the official one, and a run
stopped (or killed between checkpoints) and restarted ends with the same weights, bitwise, as an
uninterrupted run: one process, and two processes on gloo with DDP and with FSDP2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cellfm.training import TrainConfig, pretrain, warmup_cosine
from cellfm.training.optim import clip_gradients, param_groups

# the 690 real PBMCs of the Zheng 68k subset, split 5 % held out: 2 processes x batch 16 -> an
# epoch is ~20 steps, so every resume test below also crosses an epoch boundary
STEPS = 24


def _config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(corpus_dir=str(corpus), out_dir=str(out), preset="tiny", batch_size=16, max_steps=STEPS,
                lr=2e-3, start_lr=1e-5, min_lr=1e-4, warmup_steps=4, eval_every=12, eval_batches=2,
                ckpt_every=4, log_every=2, threads=1, progress=False, val_fraction=0.05,
                model={"dropout": 0.1})  # dropout on: resume must also restore the RNG
    base.update(kw)
    return TrainConfig(**base)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_model_exports(corpus, tmp_path):
    import cellfm

    out = tmp_path / "run"
    model_dir = pretrain(_config(corpus, out, max_steps=40, eval_every=10, eval_batches=0))
    log = _log(out)
    evals = [r for r in log if "val_gene_mse" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["val_gene_mse"] < 0.5 * evals[0]["val_gene_mse"]
    train = [r for r in log if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 for r in train)
    model = cellfm.load(model_dir)  # the exported folder is an ordinary CellFM model
    assert model.config.d_model == 32 and model.config.dropout == 0.1
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 40


def test_resume_is_bitwise_single_process(corpus, tmp_path):
    whole = pretrain(_config(corpus, tmp_path / "whole"))
    # stopped at step 10 (checkpoint written), restarted
    run = tmp_path / "stopped"
    pretrain(_config(corpus, run, stop_after_steps=10))
    assert not (run / "model").exists()
    assert (run / "checkpoints" / "step_0000010").is_dir()
    resumed = pretrain(_config(corpus, run))
    _assert_same(_weights(whole), _weights(resumed))
    assert any(r.get("event") == "resume" and r["step"] == 10 for r in _log(run))

    # killed after step 7: its newest checkpoint is step 4 (plus a half-written one), steps 5-7 redo
    run = tmp_path / "killed"
    pretrain(_config(corpus, run, stop_after_steps=7))
    shutil.rmtree(run / "checkpoints" / "step_0000007")
    (run / "checkpoints" / "step_0000008.tmp").mkdir()  # what a kill during a save leaves
    resumed = pretrain(_config(corpus, run))
    _assert_same(_weights(whole), _weights(resumed))


def _torchrun(cfg: TrainConfig, path: Path, **overrides) -> None:
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.to_dict().items()
                     if v is not None and not isinstance(v, dict))
    text += "\n[model]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.model.items()) + "\n"
    path.write_text(text)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cellfm.cli", "pretrain", "--config", str(path)]
    for k, v in overrides.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_is_bitwise_two_processes(corpus, tmp_path, parallel):
    cfg = _config(corpus, tmp_path / "whole", parallel=parallel)
    _torchrun(cfg, tmp_path / "whole.toml")
    whole = _weights(tmp_path / "whole" / "model")
    cfg = _config(corpus, tmp_path / "stopped", parallel=parallel)
    _torchrun(cfg, tmp_path / "stopped.toml", stop_after_steps=10)
    ckpt = tmp_path / "stopped" / "checkpoints" / "step_0000010"
    assert {p.name for p in ckpt.glob("trainer_rank*.pt")} == {"trainer_rank0.pt", "trainer_rank1.pt"}
    _torchrun(cfg, tmp_path / "stopped.toml")
    _assert_same(whole, _weights(tmp_path / "stopped" / "model"))
    epochs = {r["epoch"] for r in _log(tmp_path / "stopped") if "epoch" in r}
    assert epochs == {0, 1}  # the resumed part crossed an epoch boundary


def test_ddp_and_fsdp_agree(corpus, tmp_path):
    """FSDP2 shards parameters, gradients and optimizer state but computes the same update."""
    for parallel in ("ddp", "fsdp"):
        cfg = _config(corpus, tmp_path / parallel, parallel=parallel, max_steps=6, model={"dropout": 0.0})
        _torchrun(cfg, tmp_path / f"{parallel}.toml")
    a, b = _weights(tmp_path / "ddp" / "model"), _weights(tmp_path / "fsdp" / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_official_recipe():
    cfg = TrainConfig(corpus_dir="c", out_dir="o")
    assert (cfg.start_lr, cfg.lr, cfg.min_lr) == (1e-7, 1e-6, 5e-7)  # official config.py
    assert cfg.betas == (0.9, 0.95) and cfg.eps == 1e-8 and cfg.weight_decay == 1e-5
    assert cfg.grad_clip == 1.0 and cfg.grad_clip_mode == "per_tensor"
    kw = dict(start_lr=0.0, lr=1.0, min_lr=0.5, warmup_steps=10, decay_steps=20)
    assert warmup_cosine(5, **kw) == pytest.approx(0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(20, **kw) == pytest.approx(0.75)
    assert warmup_cosine(30, **kw) == pytest.approx(0.5) == warmup_cosine(99, **kw)

    from cellfm.model import CellFMModule

    module = CellFMModule(TrainConfig(corpus_dir="c", out_dir="o", preset="tiny").model_config())
    names = {id(p): n for n, p in module.named_parameters()}
    decay, other = param_groups(module, 1e-5)
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and not any("emb" in n or "norm" in n or n.endswith("bias") for n in decayed)
    assert {names[id(p)] for p in other["params"]} >= {n for n in names.values() if "emb" in n}

    # official ClipByNorm: each gradient on its own to norm <= 1, small ones untouched
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.1, 0.2, 0.2])
    total = clip_gradients([big, small], 1.0)
    assert total == pytest.approx((25 + 0.09) ** 0.5)
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))
    torch.testing.assert_close(small.grad, torch.tensor([0.1, 0.2, 0.2]))


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('corpus_dir = "c"\nout_dir = "o"\nlearning_rate = 1e-3\n')
    with pytest.raises(ValueError, match="unknown keys.*learning_rate"):
        TrainConfig.from_toml(bad)
    bad.write_text('corpus_dir = "c"\nout_dir = "o"\n[model]\nwidth = 3\n')
    with pytest.raises(ValueError, match="unknown \\[model\\] keys.*width"):
        TrainConfig.from_toml(bad)
    bad.write_text('corpus_dir = "c"\nout_dir = "o"\nparallel = "zero3"\n')
    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig.from_toml(bad)
    bad.write_text('corpus_dir = "corpus"\nout_dir = "runs/a"\n')
    cfg = TrainConfig.from_toml(bad)  # relative paths are relative to the file
    assert Path(cfg.corpus_dir) == tmp_path / "corpus" and Path(cfg.out_dir) == tmp_path / "runs" / "a"


def test_two_processes_need_a_parallel_mode(monkeypatch):
    from cellfm.training.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="parallel='none'"):
        init_distributed("cpu", "none")


def test_init_from_copies_a_saved_model_and_checks_its_shape(tmp_path):
    import cellfm
    from cellfm.model import CellFMModule
    from cellfm.training.loop import initial_weights

    saved = cellfm.CellFM.from_preset("tiny").save(tmp_path / "m")
    module = CellFMModule(cellfm.config.get_preset("tiny").replace(dropout=0.1))
    initial_weights(module, str(saved))
    _assert_same(_weights(saved), module.state_dict())
    wider = CellFMModule(cellfm.config.get_preset("tiny").replace(d_model=64))
    with pytest.raises(ValueError, match="make preset / \\[model\\] match the saved model"):
        initial_weights(wider, str(saved))
