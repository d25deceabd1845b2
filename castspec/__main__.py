import sys

from castspec.cli import main

sys.exit(main())
