"""Tokenizers and grain input pipelines."""

from bebop_jax.data.pipeline import (BatchIterator, DatasetStats, TokenDataset, encode_example,
                                     encode_turns, get_state, make_dataset, set_state)
from bebop_jax.data.tokenizer import (ROLES, ByteTokenizer, HFTokenizer, Tokenizer, bos_prefix,
                                      load_tokenizer, render_chat_template)

__all__ = [
    "BatchIterator", "ByteTokenizer", "DatasetStats", "HFTokenizer", "ROLES", "TokenDataset",
    "Tokenizer", "bos_prefix", "encode_example", "encode_turns", "get_state", "load_tokenizer",
    "make_dataset", "render_chat_template", "set_state",
]
