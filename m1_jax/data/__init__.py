"""Input pipelines: document sources, tokenizers and Grain packing (see docs/training.md)."""

from m1_jax.data.pipeline import DataConfig, DataIterator, build_dataset, shift_row
from m1_jax.data.sources import DataError, bundled_corpus_path, make_source
from m1_jax.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = ["ByteTokenizer", "DataConfig", "DataError", "DataIterator", "HFTokenizer", "build_dataset",
           "bundled_corpus_path", "make_source", "make_tokenizer", "shift_row"]
