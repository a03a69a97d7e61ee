import sys

from pefttune.cli import main

sys.exit(main())
