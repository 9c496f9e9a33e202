#!/usr/bin/env python
"""Pretrain a MiniMax-M1-architecture model from gin configs.

    python train.py                                   # tiny preset, bundled Shakespeare, CPU, minutes
    python train.py --gin_file=configs/small.gin      # ~1.1B-parameter M1-shaped model on one GPU
    python train.py --gin_file=configs/tiny.gin --gin.TrainConfig.steps=500 --gin.DataConfig.source=my.txt

See docs/training.md for every option.
"""

import sys

if __name__ == "__main__":
    import sharding

    sharding.initialize_distributed()  # multi-host: from the environment; a no-op on one machine
    from m1_jax.train import main

    sys.exit(main(sys.argv[1:]))
