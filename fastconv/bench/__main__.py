"""python -m fastconv.bench: the benchmark CLI (fastconv.bench.cli)."""
import sys

from .cli import main

sys.exit(main())
