import sys

from eatdist.cli.main import main

sys.exit(main())
