import sys

from raymia.cli import main

sys.exit(main())
