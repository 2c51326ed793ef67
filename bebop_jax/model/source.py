"""Where a run's starting policy comes from: the one loader every stage and experiment uses.

``--policy_dir`` names any of three things:
- a policy directory (``model_config.json`` + ``params/``, as ``save_policy`` writes),
- a run directory holding one as ``policy/`` (a pretrain_base or rl run),
- a Hugging Face Qwen3 directory (``config.json`` + ``*.safetensors``; its tokenizer too).

``find_policy`` checks the path (and, when something needs them, that the policy has
trained MTP heads) before anything is written or compiled; ``PolicySource.load`` then
places the parameters on a mesh and loads the matching tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from bebop_jax.config import ModelConfig
from bebop_jax.data.tokenizer import Tokenizer, load_tokenizer
from bebop_jax.model.hf import CONFIG_FILE as HF_CONFIG_FILE
from bebop_jax.model.hf import load_hf_checkpoint, mtp_modules_in_checkpoint
from bebop_jax.model.params_io import CONFIG_FILE, load_policy, read_policy_info
from bebop_jax.run.cli import UserError

DEFAULT_POLICY = "runs/pretrain_mtp/mtp_e2e_tv/policy"  # what experiments/pretrain_mtp.py writes


@dataclasses.dataclass(frozen=True)
class LoadedPolicy:
    model_config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    heads_trained: bool | None  # whether the MTP heads were trained (None: not recorded)


@dataclasses.dataclass(frozen=True)
class PolicySource:
    path: str   # the directory that holds the policy
    hf: bool    # a Hugging Face Qwen3 directory (else a bebop_jax policy directory)

    @property
    def heads_trained(self) -> bool | None:
        """Whether the MTP heads are trained: an HF checkpoint ships mtp.* tensors or not;
        a policy directory says so in its policy_info.json (None when it does not)."""
        if self.hf:
            return bool(mtp_modules_in_checkpoint(self.path))
        return read_policy_info(self.path).get("mtp_heads_trained")

    def load(self, mesh=None, *, tokenizer: str = "byte", expect: ModelConfig | None = None) -> LoadedPolicy:
        """Parameters placed on ``mesh`` (or one device), and the tokenizer: the HF directory's
        own, or ``tokenizer`` ("byte" or a tokenizer directory) for a policy directory. With
        ``expect``, a policy directory of another shape is refused."""
        if self.hf:
            cfg, params = load_hf_checkpoint(self.path, mesh)
            return LoadedPolicy(cfg, params, load_tokenizer(self.path), self.heads_trained)
        cfg, params = load_policy(self.path, mesh, expect=expect)
        return LoadedPolicy(cfg, params, load_tokenizer(tokenizer), self.heads_trained)


def find_policy(policy_dir: str | os.PathLike, *, heads_for: str = "", flag: str = "--policy_dir",
                hint: str = "", without_heads: str = "run without speculative rollouts") -> PolicySource:
    """The policy that ``policy_dir`` names, checked; raises UserError (one line) otherwise.

    ``heads_for`` names what in the run needs trained MTP heads ('' if nothing): a policy
    without them is refused, and the error says to train them or to ``without_heads``. ``hint`` is appended to the error for a missing policy (say,
    which command makes it).
    """
    given = os.fspath(policy_dir)
    for path in (given, os.path.join(given, "policy")):
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            source = PolicySource(path, hf=False)
            break
    else:
        if os.path.isfile(os.path.join(given, HF_CONFIG_FILE)):
            source = PolicySource(given, hf=True)
        elif not os.path.exists(given):
            raise UserError(f"{flag} {given!r}: no such directory{hint and '; ' + hint}")
        else:
            raise UserError(f"{flag} {given!r}: neither a policy directory (model_config.json + params/), "
                            "a run directory holding policy/, nor a Hugging Face directory "
                            "(config.json + *.safetensors)")
    if heads_for and source.heads_trained is False:
        what = "ships no mtp.* heads" if source.hf else "has no trained MTP heads (a pretrain_base policy)"
        raise UserError(f"{flag} {given!r} {what} for {heads_for}: train them with experiments/pretrain_mtp.py, "
                        f"or {without_heads}")
    return source
