#!/usr/bin/env python
"""Same as `kscale byte-table`, for running from a checkout: python tools/byte_table.py --help"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kronecker_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["byte-table", *sys.argv[1:]]))
