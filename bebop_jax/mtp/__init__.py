"""The MTP heads' stage: what they are trained on (``objective``), how they are measured
teacher-forced (``evaluate``), and pre-RL training by self-distillation (``pretrain``,
the library side of ``experiments/pretrain_mtp.py``; import it from its module)."""

from bebop_jax.mtp.evaluate import teacher_forced_acceptance
from bebop_jax.mtp.objective import mtp_features_loss, mtp_head_loss, mtp_loss, mtp_targets

__all__ = ["mtp_features_loss", "mtp_head_loss", "mtp_loss", "mtp_targets", "teacher_forced_acceptance"]
