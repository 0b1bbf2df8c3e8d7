import sys

from spotlight_jax.eval import main

if __name__ == "__main__":
    sys.exit(main())
