import sys

from ich.cli import main

sys.exit(main())
