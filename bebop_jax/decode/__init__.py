"""Decoding for evaluation and RL rollouts: vanilla and MTP speculative decoding with exact
rejection sampling (XLA + Pallas), behaviour log-probs and entropies per token, an
adaptive draft length, and batched text rollouts.

    generate / continue_generate   checked host calls (numpy out)
    generate_fn / continue_fn      their pure, jittable cores (device arrays out: DecodeOutput)
    DraftController                the adaptive draft length's state, kept by the caller
    rejection_sample               the verifier on its own
    DecodeStats                    a call's acceptance / throughput counts; DecodeStats.merge pools calls
"""

from bebop_jax.config import SpecConfig
from bebop_jax.decode.adaptive import DraftController, expected_tokens
from bebop_jax.decode.decoder import DecodeOutput, DecodeState, continue_fn, generate_fn, token_logprob_entropy
from bebop_jax.decode.host import GenerateResult, continue_generate, generate
from bebop_jax.decode.rejection import rejection_sample
from bebop_jax.decode.stats import DecodeStats

__all__ = ["SpecConfig", "generate", "continue_generate", "generate_fn", "continue_fn", "GenerateResult",
           "DecodeOutput", "DecodeState", "DraftController", "expected_tokens", "rejection_sample",
           "token_logprob_entropy", "DecodeStats"]
