"""Adaptive draft length: pick k in {0 (vanilla), 1, ..., K} before each decode call.

A k-draft step emits 1 + A tokens, E[A] = sum_{j<=k} prod_{i<=j} alpha_i, and costs
c(k) vanilla steps. ``DraftController`` keeps, between calls, running estimates of
the per-depth acceptance alpha_i and a measured c(k) per batch size, and chooses

    k* = argmax_k (1 + sum_{j<=k} prod_{i<=j} alpha_i) / c(k)        (c(0) = 1)

so where speculation does not pay (drafts rejected, or a verify forward that costs
as much as the tokens it saves) it falls back to vanilla decoding on its own.

- alpha_i: accepted / attempted drafts at depth i, as exponentially decayed counts
  over calls (``decay`` per call), started from the prior ``prior_alpha`` with the
  weight of ``prior_weight`` attempts. Depths a call did not run keep their estimate.
- c(k): a calibration the first time a batch size is seen, on the caller's own
  prompts: a prefill then exactly n decode steps with every row live, timed for
  n = n1 and n2, interleaved over k and repeated; the per-step time is the median
  paired difference / (n2 - n1), which removes the prefill and the call overhead.

The controller is a small host object; the caller (a rollout worker) keeps it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.decode.compile_cache import compiled
from bebop_jax.decode.decoder import fixed_steps_fn, needed_cache_len
from bebop_jax.decode.stats import DecodeStats
from bebop_jax.sampling import SamplingConfig


def expected_tokens(alpha_K, k: int) -> float:
    """Tokens per step with k drafts: 1 + sum_{j<=k} prod_{i<=j} alpha_i."""
    return 1.0 + float(np.sum(np.cumprod(np.asarray(alpha_K, np.float64)[:k])))


class DraftController:
    """Chooses the draft length of each call of an adaptive ``SpecConfig`` (see the module docstring)."""

    def __init__(self, spec: SpecConfig, *, prior_alpha: float = 0.8, prior_weight: float = 4.0,
                 decay: float = 0.7, calibration_steps: tuple[int, int] = (4, 24), calibration_repeats: int = 9):
        if not isinstance(spec, SpecConfig) or not spec.adaptive:
            raise ValueError(f"spec: a DraftController needs SpecConfig(adaptive=True), got {spec!r}")
        if not 0.0 <= prior_alpha <= 1.0:
            raise ValueError(f"prior_alpha: must be in [0, 1], got {prior_alpha}")
        if not prior_weight > 0:
            raise ValueError(f"prior_weight: must be > 0, got {prior_weight}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay: must be in (0, 1], got {decay}")
        n1, n2 = calibration_steps
        if not (isinstance(n1, int) and isinstance(n2, int) and 1 <= n1 < n2):
            raise ValueError(f"calibration_steps: need ints 1 <= n1 < n2, got {calibration_steps}")
        if not (isinstance(calibration_repeats, int) and calibration_repeats >= 1):
            raise ValueError(f"calibration_repeats: must be an int >= 1, got {calibration_repeats!r}")
        self.spec = spec
        self.max_draft = spec.num_draft
        self.decay = decay
        self.calibration_steps = (n1, n2)
        self.calibration_repeats = calibration_repeats
        self._accepted = np.full(self.max_draft, prior_alpha * prior_weight)
        self._attempted = np.full(self.max_draft, float(prior_weight))
        self.costs: dict[int, np.ndarray] = {}   # batch size -> c(k), k = 0..K, in vanilla steps
        self.chosen: list[int] = []              # the draft length of every call so far

    # -- the decision -----------------------------------------------------------------------
    @property
    def alpha(self) -> np.ndarray:
        """Current per-depth acceptance estimates [K]."""
        return self._accepted / self._attempted

    def speedups(self, batch: int) -> np.ndarray:
        """Expected tokens per unit time relative to vanilla, for k = 0..K."""
        cost = self._costs_for(batch)
        return np.array([expected_tokens(self.alpha, k) / cost[k] for k in range(self.max_draft + 1)])

    def choose(self, batch: int) -> int:
        """The draft length to run next at this batch size (ties go to the shorter draft)."""
        return int(np.argmax(self.speedups(batch)))

    def observe(self, stats: DecodeStats) -> None:
        """Update the acceptance estimates from a call's stats (``generate``'s ``stats``)."""
        k = stats.num_draft
        if k == 0:
            return
        acc = np.asarray(stats.accepted_counts, np.float64)[:k]
        att = np.asarray(stats.attempted_counts, np.float64)[:k]
        self._accepted[:k] = self.decay * self._accepted[:k] + acc
        self._attempted[:k] = self.decay * self._attempted[:k] + att

    def report(self, batch: int) -> dict:
        """JSON-able: the k chosen last, the estimates and the expected speedup of every k."""
        return {"draft_length": self.chosen[-1] if self.chosen else None, "alpha": self.alpha.tolist(),
                "cost": self._costs_for(batch).tolist(), "expected_speedup": self.speedups(batch).tolist()}

    def state_dict(self) -> dict:
        """JSON-able state, for a checkpoint (a resumed run keeps its estimates and costs)."""
        return {"accepted": self._accepted.tolist(), "attempted": self._attempted.tolist(),
                "costs": {str(b): c.tolist() for b, c in self.costs.items()}, "chosen": list(self.chosen)}

    def load_state_dict(self, state: dict) -> None:
        self._accepted = np.asarray(state["accepted"], np.float64)
        self._attempted = np.asarray(state["attempted"], np.float64)
        self.costs = {int(b): np.asarray(c, np.float64) for b, c in state["costs"].items()}
        self.chosen = list(state["chosen"])

    def check_spec(self, spec: SpecConfig) -> None:
        if spec != self.spec:
            raise ValueError(f"controller: made for {self.spec}, used with {spec}")

    # -- step costs ---------------------------------------------------------------------------
    def set_costs(self, batch: int, costs) -> None:
        """Known step costs c(0..K) in vanilla steps (instead of a calibration)."""
        c = np.asarray(costs, np.float64)
        if c.shape != (self.max_draft + 1,) or not np.all(np.isfinite(c)) or np.any(c <= 0):
            raise ValueError(f"costs: need {self.max_draft + 1} finite values > 0 (k = 0..K), got {costs!r}")
        self.costs[int(batch)] = c / c[0]

    def _costs_for(self, batch: int) -> np.ndarray:
        if batch not in self.costs:
            raise ValueError(f"batch: no step costs for batch size {batch}; call calibrate() or set_costs() first")
        return self.costs[batch]

    def prepare(self, params, model_config: ModelConfig, prompts, prompt_lens, key, sampling: SamplingConfig, *,
                max_new_tokens: int, cache_len: int | None = None, impl: str = "auto") -> SpecConfig:
        """Calibrate for this batch size if needed (in this call's caches), choose k, and return the
        config to run."""
        batch = int(prompts.shape[0])
        if batch not in self.costs:
            self.calibrate(params, model_config, prompts, prompt_lens, key, sampling, max_new_tokens=max_new_tokens,
                           cache_len=cache_len, impl=impl)
        k = self.choose(batch)
        self.chosen.append(k)
        return self.spec.with_draft(k)

    def calibrate(self, params, model_config: ModelConfig, prompts, prompt_lens, key,
                  sampling: SamplingConfig = SamplingConfig(), *, max_new_tokens: int = 64,
                  cache_len: int | None = None, impl: str = "auto") -> np.ndarray:
        """Measure c(k) for k = 0..K on these prompts (their batch size), in the caches of a call of
        ``max_new_tokens`` / ``cache_len``; returns and stores it."""
        prompts = jnp.asarray(prompts, jnp.int32)
        prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
        if prompts.ndim != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
            raise ValueError(f"prompts: a cost calibration needs a non-empty batch [B >= 1, P >= 1], "
                             f"got shape {tuple(prompts.shape)}")
        if prompt_lens.shape != (prompts.shape[0],):
            raise ValueError(f"prompt_lens: must have shape [B] = ({prompts.shape[0]},), got {tuple(prompt_lens.shape)}")
        specs = [self.spec.with_draft(k) for k in range(self.max_draft + 1)]
        per_step = measure_step_seconds(params, model_config, prompts, prompt_lens, key, sampling, specs,
                                        max_new_tokens=max_new_tokens, cache_len=cache_len,
                                        steps=self.calibration_steps, repeats=self.calibration_repeats, impl=impl)
        self.costs[int(prompts.shape[0])] = per_step / per_step[0]
        return self.costs[int(prompts.shape[0])]


def measure_step_seconds(params, model_config: ModelConfig, prompts, prompt_lens, key, sampling: SamplingConfig,
                         specs: list[SpecConfig], *, max_new_tokens: int, cache_len: int | None = None,
                         steps: tuple[int, int] = (4, 24), repeats: int = 5, impl: str = "auto") -> np.ndarray:
    """Seconds per decode step of each spec on these prompts, prefill and call overhead excluded.

    Each runs a prefill then exactly n steps with every row live, for n = n1 and n2, in the
    caches of a call of ``max_new_tokens`` (``cache_len``: the longest spec's unless given),
    compiled once; rounds interleave the specs so load from elsewhere hits them alike; the
    result is the median over rounds of (t(n2) - t(n1)) / (n2 - n1). n2 is capped so every
    spec's n2 steps fit in ``max_new_tokens``.
    """
    k_max = max(spec.drafts for spec in specs)
    n2 = min(steps[1], (max_new_tokens - 1) // (k_max + 1))
    n1 = min(steps[0], n2 // 2)
    if n1 < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: too few tokens to time two step counts at "
                         f"num_draft={k_max}; calibrate with a longer call")
    cache_len = cache_len or needed_cache_len(prompts.shape[1], max_new_tokens, SpecConfig("rejection", k_max)
                                              if k_max else SpecConfig("none"))
    exes = []
    for spec in specs:
        sig = ("fixed_steps", model_config, sampling, spec, max_new_tokens, cache_len, impl, prompts.shape)
        build = lambda spec=spec: fixed_steps_fn(model_config, sampling=sampling, spec=spec,
                                                 max_new_tokens=max_new_tokens, cache_len=cache_len, impl=impl)
        exes.append(compiled(sig, build))

    def timed(exe, n):
        t0 = time.perf_counter()
        jax.block_until_ready(exe(params, prompts, prompt_lens, key, jnp.int32(n)))
        return time.perf_counter() - t0

    for exe in exes:  # warm up
        timed(exe, n1)
    diffs = [[] for _ in exes]
    for _ in range(repeats):
        for i, exe in enumerate(exes):
            diffs[i].append((timed(exe, n2) - timed(exe, n1)) / (n2 - n1))
    return np.array([max(float(np.median(d)), 1e-9) for d in diffs])
