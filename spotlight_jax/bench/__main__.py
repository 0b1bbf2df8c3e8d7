"""`python -m spotlight_jax.bench SUBCOMMAND ...` (installed as `spotlight-bench`): see `spotlight_jax.bench`."""

import sys

from spotlight_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
