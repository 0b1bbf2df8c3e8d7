import sys

from spotlight_jax.eval import main

sys.exit(main())
