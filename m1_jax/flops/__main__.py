"""``python -m m1_jax.flops``: print the FLOPs table, check the paper's claims, write the plot."""

import sys

from m1_jax.flops.report import main

sys.exit(main())
