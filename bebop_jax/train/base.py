"""Base pretraining of the small policy (trunk + next-token head) on the tasks' worked solutions.

``pretrain_base(BaseArgs(...))`` is what ``experiments/pretrain_base.py`` runs, and what
``experiments/pretrain_mtp.py`` runs first when it is given no base. It writes to
``run_dir``: checkpoints/ (resumable), policy/ (the final model), tensorboard/,
metrics.jsonl and results.json (held-out accuracy per task).
"""

from __future__ import annotations

import dataclasses

import jax

from bebop_jax.config import MeshConfig, ModelConfig, MTPConfig, OptimizerConfig, TrainConfig
from bebop_jax.data.corpus import solution_examples
from bebop_jax.data.pipeline import make_dataset
from bebop_jax.data.tokenizer import load_tokenizer
from bebop_jax.decode.rollout import rollout
from bebop_jax.model import init_params
from bebop_jax.model.params_io import save_policy
from bebop_jax.parallel import make_mesh, maybe_initialize_distributed
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import check_task_names, get_task, grade_all
from bebop_jax.run.cli import UserError, config_dict, prepare_run_dir
from bebop_jax.train.loop import run_training
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.tables import print_table
from bebop_jax.run.files import write_results_json
from bebop_jax.train.step import init_train_state, make_optimizer, make_train_step


@dataclasses.dataclass(frozen=True)
class BaseArgs:
    run_dir: str = "runs/pretrain_base"
    tasks: tuple[str, ...] = ("arithmetic",)
    difficulty: int = 1
    train_examples: int = 4000          # distinct prompts per task
    solutions_per_example: int = 3      # independently drawn solution styles per prompt
    eval_examples: int = 128            # held-out prompts per task (0: skip the accuracy evaluation)
    eval_temperatures: tuple[float, ...] = (0.0, 1.0)
    max_new_tokens: int = 96
    tokenizer: str = "byte"
    pack: bool = True                   # several examples per row (about half of each unpacked row is padding)
    # 4 trunk layers vs 1 MTP layer whose MLP is 8 wide: the draft is much cheaper than the
    # target and cannot match it everywhere, as in real models (see pretrain_mtp.py)
    model: ModelConfig = ModelConfig.small(hidden_size=128, num_layers=4, intermediate_size=384, head_dim=32,
                                           mtp_intermediate_size=8)
    # batch 16 x 1200 steps beat 32 x 600 and 8 x 2400 at the same cost (held-out accuracy 0.30 vs 0.17-0.23)
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=4e-3, warmup_steps=30, decay_steps=1200)
    train: TrainConfig = TrainConfig(batch_size=16, seq_len=128, num_steps=1200, log_every=20, ckpt_every=200)
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_task_names(self.tasks)
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def evaluate_accuracy(params, model_config, tokenizer, tasks, examples, temperatures, max_new_tokens, key) -> dict:
    """Held-out accuracy per task and temperature (vanilla decoding)."""
    out = {}
    for task in tasks:
        exs = examples[task.name]
        if not exs:
            continue
        out[task.name] = {}
        for temp in temperatures:
            ro = rollout(params, model_config, tokenizer, [e.prompt for e in exs], key,
                         max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=temp), batch_size=64)
            out[task.name][str(temp)] = grade_all(task, exs, ro.texts)["accuracy"]
    return out


def pretrain_base(args: BaseArgs) -> dict:
    maybe_initialize_distributed()
    run_dir = prepare_run_dir(args.run_dir)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > args.model.vocab_size:
        raise UserError(f"model.vocab_size={args.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}")
    tasks = [get_task(name, difficulty=args.difficulty) for name in args.tasks]
    train_seed = args.train.seed
    corpus, eval_examples = [], {}
    for task in tasks:
        exs = task.examples("train", args.train_examples, seed=train_seed)
        corpus += solution_examples(tokenizer, task, exs, solutions_per_example=args.solutions_per_example,
                                    seed=train_seed)
        eval_examples[task.name] = task.examples("test", args.eval_examples, seed=train_seed)
    dataset = make_dataset(corpus, args.train.seq_len, args.train.batch_size, seed=train_seed,
                           overlong="drop", vocab_size=args.model.vocab_size, pack=args.pack)

    mesh = make_mesh(args.mesh)
    params = init_params(args.model, jax.random.key(train_seed), mesh)
    optimizer = make_optimizer(args.optimizer)
    mtp = MTPConfig(mode="trunk_only")
    state = init_train_state(params, mtp, optimizer, mesh)
    step_fn = make_train_step(args.model, mtp, optimizer, state, mesh)
    cfg = config_dict(args)
    with MetricLogger(run_dir) as logger:
        result = run_training(state, step_fn, dataset, num_steps=args.train.num_steps, mesh=mesh,
                              ckpt_dir=str(run_dir / "checkpoints"), ckpt_every=args.train.ckpt_every,
                              logger=logger, config=cfg, log_every=args.train.log_every, desc="pretrain_base",
                              config_keys=("model", "tasks", "difficulty", "train", "optimizer", "tokenizer",
                                           "pack"))
        params = result.state.all_params
        save_policy(run_dir / "policy", args.model, params, mtp_heads_trained=False)
        acc = evaluate_accuracy(params, args.model, tokenizer, tasks, eval_examples, args.eval_temperatures,
                                args.max_new_tokens, jax.random.key(train_seed + 1))
        for name, by_t in acc.items():
            logger.log(args.train.num_steps, {f"{name}/T{t}": v for t, v in by_t.items()}, prefix="eval/accuracy")
    results = {"accuracy": acc, "final_train_ce": result.last_metrics.get("trunk/ce"),
               "corpus_examples": len(corpus), "dropped_overlong": dataset.stats.num_overlong,
               "config": cfg}
    write_results_json(run_dir, results)
    rows = [[name] + [by_t[str(t)] for t in args.eval_temperatures] for name, by_t in acc.items()]
    print_table(rows, ["task"] + [f"acc T={t}" for t in args.eval_temperatures],
                title=f"pretrain_base: held-out accuracy ({args.eval_examples} prompts per task)")
    return results
