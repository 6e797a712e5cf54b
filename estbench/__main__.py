import sys

from estbench.cli import main

sys.exit(main())
