"""``python -m relapse`` runs the CLI."""

import sys

from relapse.cli import main

sys.exit(main())
