"""`python -m runtime.cli` is `sonoscore`."""
import sys

from runtime.cli import main

sys.exit(main())
