"""``python -m drrik`` runs the CLI (also what torchrun launches)."""

import sys

from drrik.cli import main

sys.exit(main())
