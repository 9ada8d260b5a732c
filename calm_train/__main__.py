"""`python -m calm_train ...` is the CLI, so torchrun can launch it."""
import sys

from calm_train.cli import main

sys.exit(main())
