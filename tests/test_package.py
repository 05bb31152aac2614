"""The top-level `cellfm` names: lazily imported, and never shadowed by a submodule.

A submodule named like an exported function (`cellfm/embed.py` vs `cellfm.embed`) replaces the
function on the package as soon as anything imports it; these tests catch that layout.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import cellfm


def test_no_submodule_shadows_an_exported_name():
    submodules = {m.name for m in pkgutil.iter_modules(cellfm.__path__)}
    assert not submodules & set(cellfm._LAZY), "a submodule has the name of a top-level export"


def test_embed_is_callable_many_times_after_every_export():
    """Fresh interpreter: touch every export and import every submodule, then call cellfm.embed
    three times, then another export, then embed again."""
    code = """
import importlib, pkgutil, torch, cellfm
from cellfm.datasets import pbmc_example
for name in cellfm._LAZY:
    getattr(cellfm, name)
for m in pkgutil.walk_packages(cellfm.__path__, "cellfm."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
torch.manual_seed(0)
model = cellfm.CellFM.from_preset("tiny")
adata = pbmc_example()[:20].copy()
for _ in range(3):
    cellfm.embed(adata, model, progress=False)
cellfm.get_gene_embeddings(model, adata=adata)
cellfm.embed(adata, model, progress=False)
print(callable(cellfm.embed), adata.obsm["X_cellfm"].shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "True (20, 32)"


def test_every_lazy_name_resolves():
    for name in cellfm._LAZY:
        assert getattr(cellfm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cellfm.nope  # noqa: B018
