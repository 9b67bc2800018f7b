"""Test helpers live in plain modules beside this file (backend_support, e2e_support)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
