"""Vocabulary-chunked reductions of ``hidden @ lm_head``: log-probs, entropy and draft agreement
computed over chunks of the vocabulary, never as [N, V] logits (plain XLA; float32 sums)."""

from bebop_jax.ops.draft_agreement import draft_agreement, draft_agreement_reference
from bebop_jax.ops.token_logprobs import token_logprobs, token_logprobs_reference

__all__ = ["draft_agreement", "draft_agreement_reference", "token_logprobs", "token_logprobs_reference"]
