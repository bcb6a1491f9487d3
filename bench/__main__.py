"""`python -m bench`: run every benchmark and write the report. See bench/options.py for flags."""

import sys
from pathlib import Path

# NOTE: the throwaway PostgreSQL server comes from devtools/pgserver.py, and `devtools` is not
# an installed package: the repository root must be importable, and must win over any stray
# top-level `devtools` package some dependency may have installed.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(REPO_ROOT))

from bench.run import main  # noqa: E402 - needs the path above

sys.exit(main(sys.argv[1:]))
