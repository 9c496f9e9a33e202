#!/usr/bin/env python
"""Pretrain or RL fine-tune (CISPO) a MiniMax-M1-architecture model from gin configs.

    python train.py                                   # tiny preset, bundled Shakespeare, CPU, minutes
    python train.py --gin_file=configs/small.gin      # ~1.1B-parameter M1-shaped model on one GPU
    python train.py --gin_file=configs/tiny.gin --gin.TrainConfig.steps=500 --gin.DataConfig.source=my.txt
    python train.py --gin_file=configs/cispo_tiny.gin # RL (TrainConfig.mode = 'rl'): CISPO on a synthetic task, CPU

See docs/training.md and docs/rl.md for every option. Exit codes: 2 bad config or data, 3 stopped by
non-finite steps, 4 a reward function failed.
"""

import sys

if __name__ == "__main__":
    import sharding

    sharding.initialize_distributed()  # multi-host: from the environment; a no-op on one machine
    from m1_jax.train import main

    sys.exit(main(sys.argv[1:]))
