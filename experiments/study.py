"""The Bebop study at small scale: the paper's four findings, measured, with plots and a report.

    python experiments/study.py            # after pretrain_mtp; about 28 minutes on 2 CPU cores
    python experiments/study.py --rl.num-steps 10 --temperatures 0.5 1.0   # a quick look
    python experiments/study.py --policy_dir DIR --pretrain_mtp_dir RUN    # another start / loss table

(d) RL with each MTP strategy (--strategies: frozen, online_ce, online_kl, online_e2e_tv)
    from the same pre-RL e2e-TV policy (--policy_dir), same prompts and seeds: acceptance
    through RL and each strategy's train-step cost relative to frozen (finding 4).
(a) An entropy sweep: held-out prompts decoded at several temperatures by the pre-RL
    policy and by the frozen strategy's policy after RL; per batch, mean token entropy
    against acceptance, with least-squares fits (finding 1).
(b) Greedy against rejection verification across that sweep: the gap against entropy
    (finding 2).
(c) The losses compared: the table of the pretrain_mtp run (--pretrain_mtp_dir), reused;
    e2e_tv - ce and e2e_tv - kl with paired tests over the held-out prompts' teacher-forced
    E[accepted] (finding 3).

Writes RUN_DIR/results.json, RUN_DIR/report.md and RUN_DIR/plots/*.png. Rerun the same
command after a crash: finished parts are read back, a killed RL run resumes. The library
side is bebop_jax.rl.study (stages) and bebop_jax.analysis (statistics, plots, report).
"""

from __future__ import annotations

from bebop_jax.rl.study import StudyArgs, run_study
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: run_study(parse(StudyArgs)))
