import sys

from remp.entrypoints.cli import main

sys.exit(main())
