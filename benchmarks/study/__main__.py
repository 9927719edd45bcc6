"""``python -m benchmarks.study [options]`` runs the long-context study (``benchmarks.study.cli``)."""
import sys

from benchmarks.study.cli import main

sys.exit(main())
