import sys
from pathlib import Path

# `dist_utils` and `reference` are shared helpers, importable from every test folder.
sys.path.insert(0, str(Path(__file__).parent))
