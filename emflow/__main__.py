import sys

from emflow.cli import main

sys.exit(main())
