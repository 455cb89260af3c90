"""``python -m tokenmill.server`` runs the server with the flags of ``tokenmill serve``."""

import sys

from tokenmill.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
