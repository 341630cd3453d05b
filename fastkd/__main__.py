"""`python -m fastkd ...` (what `torchrun -m fastkd train ...` runs): the `fastkd` command."""
import sys

from fastkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
