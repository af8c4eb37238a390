"""`python -m onnxbn` runs the command line."""

import sys

from onnxbn.cli import main

sys.exit(main())
