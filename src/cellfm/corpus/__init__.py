"""Pretraining corpora: build Arrow shards from count files (`build_corpus`) and stream tokenized,
masked batches from them (`CorpusDataset`, `CorpusLoader`)."""

from cellfm.corpus.builder import build_corpus
from cellfm.corpus.dataset import CorpusDataset, tokenize_batch
from cellfm.corpus.epoch_plan import cell_generator
from cellfm.corpus.loader import CorpusLoader
from cellfm.corpus.manifest import CorpusManifest, ShardInfo
from cellfm.corpus.shards import ShardReader

__all__ = ["build_corpus", "CorpusDataset", "CorpusLoader", "CorpusManifest", "ShardInfo", "ShardReader",
           "cell_generator", "tokenize_batch"]
