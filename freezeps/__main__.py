import sys

from freezeps.cli import main

sys.exit(main())
