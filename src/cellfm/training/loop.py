"""`pretrain(cfg)`: the masked-value pretraining loop (single process, DDP or FSDP2).

    corpus batches (CellBatch, this rank's share) -> module -> pretraining_loss
    -> backward -> clip 1.0 -> Adam -> warmup-cosine LR; every ckpt_every steps a DCP checkpoint,
    every eval_every steps the held-out masked-value MSE; at the end `out_dir/model` (CellFM folder).

Resuming is automatic: if `out_dir/checkpoints` holds a checkpoint, training continues from the
newest one (model, optimizer, scheduler, RNG, loader position), and the result is the same as an
uninterrupted run (bitwise on CPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cellfm.cellfm import CellFM, load
from cellfm.corpus import CorpusDataset, CorpusLoader
from cellfm.corpus.soma import SomaQuery
from cellfm.corpus.soma_stream import SomaStreamDataset, SomaStreamLoader
from cellfm.distributed import all_reduce_sum, barrier
from cellfm.model import CellFMModule, pretraining_loss
from cellfm.training.checkpoint import (
    checkpoint_dirs,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cellfm.training.config import TrainConfig
from cellfm.training.distributed import DistEnv, init_distributed, wrap_model
from cellfm.training.evaluate import held_out_dataset, masked_value_mse
from cellfm.training.optim import clip_gradients, make_optimizer
from cellfm.training.probe import load_probe_set, probe_scores


class _RunLog:
    """log.jsonl on rank 0, mirrored to TensorBoard when `tensorboard` is installed."""

    def __init__(self, out: Path, on: bool) -> None:
        self.path, self.on, self.tb = out / "log.jsonl", on, None
        if on:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.on:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


def initial_weights(module: torch.nn.Module, source: str) -> None:
    """Copy the weights of a saved model (name, folder or official file) into `module`."""

    model = load(source)
    own, theirs = module.config, model.config
    if own.replace(dropout=theirs.dropout, lora_rank=theirs.lora_rank) != theirs:
        raise ValueError(f"init_from={source!r} has config {theirs}, the training config builds {own}: "
                         "make preset / [model] match the saved model")
    missing, unexpected = module.load_state_dict(model.module.state_dict(), strict=False)
    bad = [k for k in missing if "lora" not in k] + list(unexpected)
    if bad:
        raise ValueError(f"init_from={source!r}: keys do not match the training model: {bad[:10]}")


def export_model(module: torch.nn.Module, cfg: TrainConfig, env: DistEnv, path: Path) -> Path | None:
    """Gather the full state dict (FSDP2: from all ranks) and write a CellFM folder on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    mc = cfg.model_config()
    plain = CellFMModule(mc)
    plain.load_state_dict(state)
    return CellFM(mc, plain).save(path, overwrite=True)


def load_probes(cfg: TrainConfig, mc) -> list:
    """The labelled probe cells of `cfg.probe_files`, tokenized for the model's vocabulary."""

    return [load_probe_set(f, key, mc, max_cells=cfg.probe_max_cells, seed=cfg.seed)
            for f, key in zip(cfg.probe_files, cfg.probe_label_keys(), strict=True)]


def soma_source(cfg: TrainConfig, mc) -> tuple[SomaStreamDataset, SomaStreamLoader, SomaStreamDataset | None]:
    """(train dataset, its loader, held-out dataset or None) read straight from `cfg.soma`."""
    opts = dict(cfg.soma)
    stream = {k: opts.pop(k) for k in ("min_genes", "io_batch_size", "shuffle_chunk_size") if k in opts}
    query = SomaQuery(**opts)
    kw = dict(vocab=mc.vocabulary, seed=cfg.seed, batch_size=cfg.batch_size, max_genes=mc.max_genes, **stream)
    dataset = SomaStreamDataset(query, mask_ratio=mc.mask_ratio, hide_fraction=mc.hide_fraction,
                                split="train" if cfg.val_fraction else "all", val_fraction=cfg.val_fraction,
                                **kw)
    val_ds = None
    if cfg.val_fraction:
        val_ds = SomaStreamDataset(query, split="val", val_fraction=cfg.val_fraction, shuffle=False, **kw)
    return dataset, SomaStreamLoader(dataset, num_workers=cfg.num_workers), val_ds


def pretrain(cfg: TrainConfig) -> Path:
    """Train as configured; returns `out_dir/model` (the exported CellFM folder)."""

    env = init_distributed(cfg.device, cfg.parallel)
    if cfg.threads and env.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    mc = cfg.model_config()

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    module = CellFMModule(mc)
    if cfg.init_from:
        initial_weights(module, cfg.init_from)
    module = module.to(env.device)
    torch.manual_seed(cfg.seed + 1 + env.rank)  # each rank its own dropout draws
    module.activation_checkpointing = cfg.activation_checkpointing
    if mc.pad_zero:  # the zero embedding is only used without pad_zero: no gradient, so freeze it
        module.zero_emb.requires_grad_(False)  # (DDP would wait for its gradient forever)
    module.train()
    model = wrap_model(module, cfg.parallel, env)
    optimizer, scheduler = make_optimizer(module, cfg)  # `module`: the parameter names, also under DDP
    autocast_dtype = torch.bfloat16 if cfg.bf16 and env.device.type == "cuda" else None

    if cfg.soma:
        dataset, loader, val_ds = soma_source(cfg, mc)
    else:
        dataset = CorpusDataset(cfg.corpus_dir, seed=cfg.seed, epoch=0, rank=env.rank,
                                world_size=env.world_size, batch_size=cfg.batch_size, max_genes=mc.max_genes,
                                mask_ratio=mc.mask_ratio, hide_fraction=mc.hide_fraction,
                                split="train" if cfg.val_fraction else "all", val_fraction=cfg.val_fraction,
                                mix_shards=cfg.mix_shards, unexpressed_ratio=cfg.unexpressed_ratio)
        loader = CorpusLoader(dataset, num_workers=cfg.num_workers)
        val_ds = None
        if cfg.val_fraction:
            val_ds = held_out_dataset(cfg.corpus_dir, batch_size=cfg.batch_size,
                                      val_fraction=cfg.val_fraction, max_genes=mc.max_genes, rank=env.rank,
                                      world_size=env.world_size, seed=cfg.seed)
    if dataset.batches_per_rank == 0:
        raise ValueError(f"corpus {cfg.corpus_dir or cfg.soma} has {dataset.n_cells} training cells: too few "
                         f"for batch_size={cfg.batch_size} x {env.world_size} processes; lower batch_size")
    if val_ds is not None and val_ds.batches_per_rank == 0:
        val_ds = None

    step, tokens_seen, tokens_local, elapsed_before = 0, 0, 0, 0.0
    found = checkpoint_dirs(ckpt_root)
    if found:
        state = load_checkpoint(found[-1][1], module, optimizer, env)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loader.load_state_dict(state["loader"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
    log = _RunLog(out, env.is_main)
    if found:
        log.write({"event": "resume", "step": step, "checkpoint": found[-1][1].name})

    probes = load_probes(cfg, mc)  # every rank runs the probe forward (FSDP2 gathers across ranks)
    if probes and step == 0:  # the random init: the reference a trained CLS must beat
        log.write({"step": 0, **probe_scores(module, probes, env.device)})

    bar = None
    if cfg.progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    stop_at = min(cfg.max_steps, cfg.stop_after_steps or cfg.max_steps)
    epoch_iter = iter(loader)
    while step < stop_at:
        batch = next(epoch_iter, None)
        if batch is None:  # epoch finished: next epoch, new order and new masks
            loader.set_epoch(dataset.epoch + 1)
            epoch_iter = iter(loader)
            continue
        batch = batch.to(env.device)
        with torch.autocast(env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = model(batch.gene_ids, batch.values, batch.token_mask, batch.hidden_mask)
        terms = pretraining_loss(output, batch, cfg.cellwise_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = clip_gradients(module.parameters(), cfg.grad_clip, cfg.grad_clip_mode)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        tokens_local += int(batch.token_mask.sum())
        if step % cfg.log_every == 0 or step == stop_at:
            stats = torch.tensor([float(terms[k].detach()) for k in ("loss", "gene_mse", "cell_mse")]
                                 + [float(tokens_local)], dtype=torch.float64, device=env.device)
            stats[:3] /= env.world_size
            all_reduce_sum(stats)
            tokens_seen, tokens_local = tokens_seen + int(stats[3]), 0
            if not torch.isfinite(stats[0]):  # every rank sees the reduced value, so all stop
                raise FloatingPointError(
                    f"training loss is {float(stats[0])} at step {step}: lower lr (now {lr:.2e}) or "
                    f"grad_clip; the run restarts from its newest checkpoint in {ckpt_root}")
            log.write({"step": step, "loss": float(stats[0]), "gene_mse": float(stats[1]),
                       "cell_mse": float(stats[2]), "lr": lr, "grad_norm": float(grad_norm),
                       "tokens": tokens_seen, "epoch": dataset.epoch,
                       "elapsed_s": elapsed_before + time.perf_counter() - t0})
            if bar is not None:
                bar.set_postfix(loss=f"{float(stats[0]):.4f}", lr=f"{lr:.2e}")
        if bar is not None:
            bar.update(1)
        if val_ds is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            ev = masked_value_mse(model, val_ds, max_batches=cfg.eval_batches, device=env.device,
                                  autocast_dtype=autocast_dtype)
            log.write({"step": step, **ev})
        if probes and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            log.write({"step": step, **probe_scores(module, probes, env.device)})
        if step % cfg.ckpt_every == 0 or step == stop_at:
            trainer_state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                             "loader": loader.state_dict(), "tokens": tokens_seen,
                             "elapsed_s": elapsed_before + time.perf_counter() - t0}
            save_checkpoint(ckpt_root, step, module, optimizer, trainer_state, env, keep=cfg.keep_checkpoints)
    if bar is not None:
        bar.close()
    model_dir = out / "model"
    if step >= cfg.max_steps:
        export_model(module, cfg, env, model_dir)
    barrier()
    return model_dir
