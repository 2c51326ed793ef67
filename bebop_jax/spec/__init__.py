"""Rejection sampling (XLA reference + Pallas kernel) and the speculative decoder."""

from bebop_jax.config import SpecConfig
from bebop_jax.spec.decoder import DecodeState, GenerateResult, continue_generate, generate
from bebop_jax.spec.rejection import rejection_sample

__all__ = ["SpecConfig", "generate", "continue_generate", "GenerateResult", "DecodeState", "rejection_sample"]
