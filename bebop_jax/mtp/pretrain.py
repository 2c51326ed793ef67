"""Pre-RL MTP training by self-distillation, and the loss comparison of the paper
(the library side of ``experiments/pretrain_mtp.py``).

1. A frozen base: ``--policy_dir`` (a pretrain_base run or policy directory, or a Qwen3
   Hugging Face directory), or, without one, a base trained into RUN_DIR/base first.
2. Self-distillation data: the base's own responses to task prompts, sampled at the
   rollout temperature (what the MTP heads will have to predict in RL).
3. MTP heads trained with each loss (``--loss ce|kl|tv|e2e_tv|all``) from the same
   initialisation on the same data, trunk frozen. Real models ship MTP heads pretrained
   with CE, and pre-RL MTP training starts from those: with a Hugging Face base that has
   mtp.* tensors every loss starts from them. Otherwise the initialisation is a shared CE
   warm start of fresh heads, long enough for CE to level off (``--warm_start_steps``;
   0 = fresh heads). The TV losses need it: their gradient vanishes on tokens a head gives
   ~0 probability, so from scratch they learn slowly what CE learns fast.
4. Evaluation on held-out prompts: teacher-forced acceptance on base rollouts, and real
   speculative decoding (greedy and rejection verification at each temperature):
   per-depth acceptance, mean accepted drafts, tokens per forward.

Everything is written to RUN_DIR: results.json, tensorboard/, per-loss checkpoints
(rerun the same command to resume after a crash).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import LOSS_NAMES, MeshConfig, MTPConfig, OptimizerConfig, SpecConfig, TrainConfig
from bebop_jax.data.corpus import rollout_examples
from bebop_jax.data.pipeline import make_dataset
from bebop_jax.data.tokenizer import load_tokenizer
from bebop_jax.decode.rollout import rollout
from bebop_jax.decode.stats import DecodeStats
from bebop_jax.model.hf import copy_tokenizer_files, export_hf_checkpoint
from bebop_jax.model.params import head_params, init_mtp_params, merge_params, trunk_params
from bebop_jax.model.params_io import CONFIG_FILE, load_policy, save_policy
from bebop_jax.model.source import find_policy
from bebop_jax.mtp.evaluate import teacher_forced_acceptance
from bebop_jax.parallel import make_mesh, maybe_initialize_distributed
from bebop_jax.run.cli import UserError, config_dict, prepare_run_dir, refuse_flags
from bebop_jax.run.files import cached_json, write_results_json
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.tables import print_table
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import check_task_names, get_task, grade_all
from bebop_jax.train.base import BaseArgs, pretrain_base
from bebop_jax.train.loop import run_training
from bebop_jax.train.step import init_train_state, make_optimizer, make_train_step

METHODS = ("greedy", "rejection")


@dataclasses.dataclass(frozen=True)
class MTPArgs:
    run_dir: str = "runs/pretrain_mtp"
    policy_dir: str | None = None        # the base: a pretrain_base run / policy directory, or a Qwen3 HF directory
    tokenizer: str = "byte"              # of a policy directory or of the base trained here (an HF base brings its own)
    loss: str = "all"                    # ce | kl | tv | e2e_tv | all
    tasks: tuple[str, ...] = ("arithmetic",)
    distill_prompts: int = 1024          # train prompts per task whose base responses form the MTP data
    eval_prompts: int = 64               # held-out prompts per task
    rollout_temperature: float = 1.0     # temperature of the distillation rollouts and of the loss
    eval_temperatures: tuple[float, ...] = (0.6, 1.0)
    num_draft: int = 3                   # K at evaluation (<= the model's num_mtp_depths)
    max_new_tokens: int = 96
    warm_start_steps: int = 300          # shared CE steps before the per-loss training (0: fresh heads)
    fresh_heads: bool = False            # with a Hugging Face --policy_dir: ignore the mtp.* heads it ships
    mtp_intermediate_size: int | None = None  # MLP width of the MTP heads trained here (None: the base's)
    batch_size_decode: int = 64
    # decay_steps is set per phase (warm start, each loss) to that phase's number of steps (the flag is refused)
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=6e-3, warmup_steps=10, decay_steps=90)
    train: TrainConfig = TrainConfig(batch_size=32, seq_len=128, num_steps=90, log_every=10, ckpt_every=30)
    mesh: MeshConfig = MeshConfig()
    base: BaseArgs = BaseArgs()          # how to train a base when none is given

    def __post_init__(self):
        if self.loss not in LOSS_NAMES + ("all",):
            raise ValueError(f"loss: must be one of {LOSS_NAMES + ('all',)}, got {self.loss!r}")
        check_task_names(self.tasks)
        if self.fresh_heads and not self.policy_dir:
            raise ValueError("fresh_heads: only means something with a Hugging Face --policy_dir "
                             "(other bases ship no trained heads)")
        if self.mtp_intermediate_size is not None and self.mtp_intermediate_size < 1:
            raise ValueError(f"mtp_intermediate_size: must be >= 1 (or unset), got {self.mtp_intermediate_size}")
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps: must be >= 0, got {self.warm_start_steps}")
        if any(t <= 0 for t in self.eval_temperatures) or self.rollout_temperature <= 0:
            raise ValueError("eval_temperatures / rollout_temperature: must be > 0")

    @property
    def losses(self) -> tuple[str, ...]:
        return LOSS_NAMES if self.loss == "all" else (self.loss,)


# Flags this stage sets itself: refused rather than silently replaced.
REFUSED = {
    "optimizer.decay_steps": "each phase decays over its own steps (--warm_start_steps, --train.num-steps)",
    "base.run_dir": "the base is trained into RUN_DIR/base",
    "base.tasks": "the base is trained on --tasks",
    "base.tokenizer": "the base uses --tokenizer",
}


def find_base(args: MTPArgs):
    """The ``--policy_dir`` base, checked (None: a base is trained here)."""
    if not args.policy_dir:
        return None
    source = find_policy(args.policy_dir)
    if args.fresh_heads and not source.hf:
        raise UserError("--fresh_heads: only means something with a Hugging Face --policy_dir "
                        "(other bases ship no trained heads)")
    return source


def load_base(args: MTPArgs, source, run_dir, mesh):
    """(model_config, params, tokenizer) of the frozen base: ``source`` (``find_base``) or, when it is
    None, the base trained into RUN_DIR/base (trained first if it is not there)."""
    if source is not None:
        loaded = source.load(mesh, tokenizer=args.tokenizer)
        return loaded.model_config, loaded.params, loaded.tokenizer
    base_args = dataclasses.replace(args.base, run_dir=str(run_dir / "base"), tasks=args.tasks,
                                    tokenizer=args.tokenizer)
    if not (run_dir / "base" / "policy" / CONFIG_FILE).is_file():
        print(f"no --policy_dir given: training a base model into {base_args.run_dir}", flush=True)
        pretrain_base(base_args)
    model_config, params = load_policy(run_dir / "base" / "policy", mesh, expect=args.base.model)
    return model_config, params, load_tokenizer(args.tokenizer)


def starting_heads(args: MTPArgs, model_config, base_params, mesh, source=None):
    """(heads, shipped): the mtp.* heads a Hugging Face base ships (``source``, from ``find_policy``),
    which are CE-pretrained and which the warm start only imitates, unless --fresh_heads; else fresh ones."""
    if source is not None and source.hf and not args.fresh_heads and source.heads_trained:
        heads = head_params(base_params)
        width = next(iter(heads.values()))["layer"]["mlp"]["up_proj"].shape[-1]
        if width != model_config.mtp_mlp_size:
            raise UserError(f"--mtp_intermediate_size {model_config.mtp_mlp_size}: the mtp.* heads in "
                            f"{source.path} are {width} wide; add --fresh_heads to train new ones")
        return heads, True
    return init_mtp_params(model_config, jax.random.key(args.train.seed + 7), mesh), False


def distillation_rollouts(args: MTPArgs, params, model_config, tokenizer, tasks, run_dir, split: str, n: int, seed: int):
    """Base responses to ``n`` prompts per task, cached in RUN_DIR (regenerated identically if absent)."""
    def sample() -> dict:
        data = {}
        for i, task in enumerate(tasks):
            exs = task.examples(split, n, seed=seed)
            ro = rollout(params, model_config, tokenizer, [e.prompt for e in exs], jax.random.key(seed * 1000 + i),
                         max_new_tokens=args.max_new_tokens,
                         sampling=SamplingConfig(temperature=args.rollout_temperature),
                         batch_size=args.batch_size_decode)
            data[task.name] = {"prompt_ids": ro.prompt_ids, "response_ids": ro.response_ids,
                               "accuracy": grade_all(task, exs, ro.texts)["accuracy"]}
        return data

    return cached_json(run_dir / f"rollouts_{split}.json", sample)


def distilled_examples(rollouts: dict) -> list:
    """The examples of ``distillation_rollouts``' data: each prompt with its base response."""
    return [ex for d in rollouts.values() for ex in rollout_examples(d["prompt_ids"], d["response_ids"])]


def held_out_batches(rollouts: dict, *, seq_len: int, batch_size: int, seed: int, vocab_size: int) -> list[dict]:
    """The teacher-forced evaluation batches of the held-out rollouts, in order (one pass, no
    shuffle): what pretrain_mtp evaluates on and what the study's paired tests rebuild."""
    examples = distilled_examples(rollouts)
    return list(make_dataset(examples, seq_len, min(batch_size, len(examples)), seed=seed, shuffle=False,
                             num_epochs=1, drop_remainder=False, overlong="truncate", vocab_size=vocab_size))


def train_mtp(args: MTPArgs, loss: str, heads, base_params, model_config, dataset, mesh, run_dir, logger, *,
              name: str, num_steps: int, export_from: str | None = None):
    """MTP heads ``heads`` trained ``num_steps`` steps with ``loss`` on the frozen base; saved to RUN_DIR/name
    (and, with ``export_from``, the Hugging Face base directory, as safetensors with the mtp.* heads
    plus that base's tokenizer in RUN_DIR/name/hf: a directory ``--policy_dir`` takes as it is)."""
    trunk = trunk_params(base_params)
    # The train step donates its state, frozen trunk included: give it copies so the
    # base and the starting heads stay usable for the next loss.
    params = merge_params(jax.tree.map(jnp.copy, heads), jax.tree.map(jnp.copy, trunk))
    mtp = MTPConfig(loss=loss, mode="mtp_only", temperature=args.rollout_temperature)
    opt_config = dataclasses.replace(args.optimizer, decay_steps=num_steps,
                                     warmup_steps=min(args.optimizer.warmup_steps, num_steps))
    optimizer = make_optimizer(opt_config)
    state = init_train_state(params, mtp, optimizer, mesh)
    step_fn = make_train_step(model_config, mtp, optimizer, state, mesh)
    cfg = {"loss": loss, "mtp": config_dict(mtp), "optimizer": config_dict(opt_config),
           "train": config_dict(args.train), "model": config_dict(model_config), "num_steps": num_steps,
           "warm_start_steps": args.warm_start_steps}
    result = run_training(state, step_fn, dataset, num_steps=num_steps, mesh=mesh,
                          ckpt_dir=str(run_dir / name / "checkpoints"), ckpt_every=args.train.ckpt_every,
                          logger=logger, config=cfg, log_every=args.train.log_every, desc=name, tb_prefix=name)
    params = result.state.all_params
    save_policy(run_dir / name / "policy", model_config, params, mtp_heads_trained=True)
    if export_from is not None:
        export_hf_checkpoint(model_config, params, run_dir / name / "hf", overwrite=True)
        copy_tokenizer_files(export_from, run_dir / name / "hf")
    return params


def evaluate_spec(args: MTPArgs, params, model_config, tokenizer, tasks, eval_examples, key) -> dict:
    """Real speculative decoding on held-out prompts: acceptance[method][temperature]."""
    out = {m: {} for m in METHODS}
    for method in METHODS:
        for temp in args.eval_temperatures:
            stats, acc = [], []
            for task in tasks:
                exs = eval_examples[task.name]
                ro = rollout(params, model_config, tokenizer, [e.prompt for e in exs], key,
                             max_new_tokens=args.max_new_tokens, sampling=SamplingConfig(temperature=temp),
                             spec=SpecConfig(method=method, num_draft=args.num_draft),
                             batch_size=args.batch_size_decode)
                stats.append(ro.stats)
                acc.append(grade_all(task, exs, ro.texts)["accuracy"])
            pooled = DecodeStats.merge(stats)  # over the tasks' prompts
            out[method][str(temp)] = {
                "mean_accepted": pooled.mean_accepted,
                "per_depth": list(pooled.per_depth_acceptance),
                "tokens_per_forward": pooled.tokens_per_forward,
                "accuracy": float(np.mean(acc)),
            }
    return out


def pretrain_mtp(args: MTPArgs) -> dict:
    refuse_flags(args, REFUSED)
    maybe_initialize_distributed()
    source = find_base(args)  # a bad base fails before the run directory is made
    run_dir = prepare_run_dir(args.run_dir)
    mesh = make_mesh(args.mesh)
    model_config, base_params, tokenizer = load_base(args, source, run_dir, mesh)
    hf_base = source is not None and source.hf
    base_config = model_config  # the rollouts run the trunk alone; the heads trained below may be narrower
    if args.mtp_intermediate_size is not None:
        model_config = dataclasses.replace(model_config, mtp_intermediate_size=args.mtp_intermediate_size)
    heads, shipped = starting_heads(args, model_config, base_params, mesh, source)  # refuses a width mismatch before any work
    if args.num_draft > model_config.num_mtp_depths:
        raise UserError(f"num_draft={args.num_draft} exceeds the model's num_mtp_depths={model_config.num_mtp_depths}")
    tasks = [get_task(name, difficulty=args.base.difficulty) for name in args.tasks]
    seed = args.train.seed
    train_ro = distillation_rollouts(args, base_params, base_config, tokenizer, tasks, run_dir, "train",
                                     args.distill_prompts, seed)
    test_ro = distillation_rollouts(args, base_params, base_config, tokenizer, tasks, run_dir, "test",
                                    args.eval_prompts, seed)
    eval_examples = {t.name: t.examples("test", args.eval_prompts, seed=seed) for t in tasks}
    corpus = distilled_examples(train_ro)
    dataset = make_dataset(corpus, args.train.seq_len, args.train.batch_size, seed=seed, overlong="truncate",
                           vocab_size=model_config.vocab_size)
    eval_batches = held_out_batches(test_ro, seq_len=args.train.seq_len, batch_size=args.train.batch_size,
                                    seed=seed, vocab_size=model_config.vocab_size)

    acceptance, teacher_forced, entropy, warm = {}, {}, {}, None

    def teacher_forced_by_temperature(params) -> dict:
        return {str(t): teacher_forced_acceptance(params, model_config, eval_batches, t) for t in args.eval_temperatures}

    with MetricLogger(run_dir) as logger:
        if shipped:
            print(f"starting from the mtp.* heads in {source.path} (no warm start; "
                  "--fresh_heads to start from fresh ones)", flush=True)
            warm = {"steps": 0, "source": "checkpoint", "teacher_forced": teacher_forced_by_temperature(base_params)}
        elif args.warm_start_steps:
            # Its own data order, so the per-loss phases below do not replay its batches.
            warm_data = make_dataset(corpus, args.train.seq_len, args.train.batch_size, seed=seed + 1,
                                     overlong="truncate", vocab_size=model_config.vocab_size)
            params = train_mtp(args, "ce", heads, base_params, model_config, warm_data, mesh, run_dir, logger,
                               name="warm_start_ce", num_steps=args.warm_start_steps)
            heads = head_params(params)
            warm = {"steps": args.warm_start_steps, "source": "ce_warm_start",
                    "teacher_forced": teacher_forced_by_temperature(params)}
        for loss in args.losses:
            params = train_mtp(args, loss, heads, base_params, model_config, dataset, mesh, run_dir, logger,
                               name=f"mtp_{loss}", num_steps=args.train.num_steps,
                               export_from=source.path if hf_base else None)
            teacher_forced[loss] = teacher_forced_by_temperature(params)
            entropy = {t: v["entropy"] for t, v in teacher_forced[loss].items()}
            acceptance[loss] = evaluate_spec(args, params, model_config, tokenizer, tasks, eval_examples,
                                             jax.random.key(seed + 11))
            for method, by_t in acceptance[loss].items():
                for temp, r in by_t.items():
                    logger.log(args.train.num_steps, {"mean_accepted": r["mean_accepted"],
                                                      "tokens_per_forward": r["tokens_per_forward"]},
                               prefix=f"eval/{loss}/{method}/T{temp}")
    results = {
        "acceptance": acceptance,
        "teacher_forced": teacher_forced,
        "warm_start": warm,
        "base": {"entropy_nats": entropy,
                 "rollout_accuracy": {t: d["accuracy"] for t, d in train_ro.items()},
                 "held_out_accuracy": {t: d["accuracy"] for t, d in test_ro.items()}},
        "num_draft": args.num_draft,
        "config": config_dict(args),
    }
    write_results_json(run_dir, results)
    print_summary(args, results)
    return results


def print_summary(args: MTPArgs, results: dict) -> None:
    k = args.num_draft
    rows = []
    for loss, by_m in results["acceptance"].items():
        for method, by_t in by_m.items():
            for temp, r in by_t.items():
                tf = results["teacher_forced"][loss][temp]["mean_accepted"][method]
                rows.append([loss, method, temp, r["mean_accepted"], r["mean_accepted"] / k,
                             " ".join(f"{a:.2f}" for a in r["per_depth"]), r["tokens_per_forward"], tf])
    print_table(rows, ["loss", "verify", "T", "E[accepted]", "accept rate", "per-depth", "tokens/fwd", "TF E[acc]"],
                title=f"MTP heads by loss: speculative decoding on held-out prompts, K={k} "
                      f"(accept rate = E[accepted]/K; TF = teacher-forced on base rollouts)",
                float_format="{:.3f}")
    if results["warm_start"]:
        w = results["warm_start"]
        start = ("every loss starts from the checkpoint's mtp.* heads," if w["source"] == "checkpoint"
                 else f"shared CE warm start ({w['steps']} steps) before each loss,")
        print(f"{start} teacher-forced E[accepted] "
              "(rejection): " + ", ".join(f"T={t}: {v['mean_accepted']['rejection']:.3f}"
                                          for t, v in w["teacher_forced"].items()))
    ent = results["base"]["entropy_nats"]
    print("base mean token entropy (nats) on its own held-out responses: "
          + ", ".join(f"T={t}: {v:.3f}" for t, v in ent.items()))


