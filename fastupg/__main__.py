"""`python -m fastupg train|eval|bench ...` (see fastupg.cli)."""
import sys

from fastupg.cli import main

if __name__ == "__main__":
    sys.exit(main())
