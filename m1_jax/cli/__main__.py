"""``python -m m1_jax.cli`` is ``m1-jax``."""

import sys

from m1_jax.cli import main

sys.exit(main())
