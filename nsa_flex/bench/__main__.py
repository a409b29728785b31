"""``python -m nsa_flex.bench``."""

import sys

from .cli import main

sys.exit(main())
