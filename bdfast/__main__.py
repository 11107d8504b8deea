"""``python -m bdfast`` is the ``bdfast`` command."""
import sys

from bdfast.cli import main

sys.exit(main())
