#!/usr/bin/env python
"""The memory-budget sweep as a script: the same code and options as `edge-prism sweep`.

    python scripts/sweep.py default --device cpu --memory-budgets 10%,25%,50%,100% \
        --operating-points 24,18 -n 32 --out profiles/sweep_default_cpu.csv \
        --plot profiles/sweep_default_cpu.png
    python scripts/sweep.py --synthetic olmoe-1b-7b --layers 2 --device cpu --out sweep.csv
"""

from __future__ import annotations

import sys

from edge_prism.sweep import main

if __name__ == "__main__":
    sys.exit(main())
