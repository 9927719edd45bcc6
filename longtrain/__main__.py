"""``python -m longtrain <command> ...`` is the same as the ``longtrain`` console command."""
import sys

from longtrain.cli import main

sys.exit(main())
