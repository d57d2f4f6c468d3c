"""`python -m engine_build` runs the `nemotron-build` CLI."""

import sys

from engine_build.cli import main

sys.exit(main())
