"""``python -m longtrain.cli <command> ...`` (what the deepspeed launcher and torchrun start)."""
import sys

from longtrain.cli import main

sys.exit(main())
