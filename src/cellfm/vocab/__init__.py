"""Gene vocabularies and the mapping of a dataset's gene identifiers onto them."""

from cellfm.vocab.gene_mapping import GeneMapping, map_genes
from cellfm.vocab.vocabulary import GeneVocabulary, load_vocabulary

__all__ = ["GeneMapping", "GeneVocabulary", "load_vocabulary", "map_genes"]
