"""`python -m fastdrag ...`: the `fastdrag` command (`fastdrag.cli`)."""
import sys

from .cli import main

sys.exit(main())
