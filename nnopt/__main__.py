import sys

from nnopt.cli import main

sys.exit(main())
