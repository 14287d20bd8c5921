"""``python -m handsoff`` (and ``torchrun -m handsoff``) runs the command line."""
import sys

from handsoff.cli import main

sys.exit(main())
