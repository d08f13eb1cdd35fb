"""Measure a model's non-unification score: `python jobs/measure.py key=value ...`.

The same as `gapray measure`; here so that `ray job submit --working-dir . -- python jobs/measure.py`
works on a cluster without the console script on PATH.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gapray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["measure", *sys.argv[1:]]))
