"""``python -m tokenmill.plan`` runs the planner without the top-level CLI."""

import sys

from tokenmill.plan.cli import main

sys.exit(main())
