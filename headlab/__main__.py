import sys

from headlab.cli import main

sys.exit(main())
