import gc
import sys

# the command's imports make long-lived objects, not garbage: no collection while they load
# (emflow.cli.main collects again, after freezing them)
gc.disable()

from emflow.cli import main  # noqa: E402

sys.exit(main())
