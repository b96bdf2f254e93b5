import sys

from roseprior.cli import main

sys.exit(main())
