import sys

from estbench.cli.commands import main

sys.exit(main())
