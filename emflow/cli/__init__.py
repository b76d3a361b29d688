"""The ``emflow`` command: one small module per command, registered here.

Every :class:`~emflow.errors.EmflowError` is printed as one line on stderr
(no traceback) and exits with its code (2 for bad input).
"""

from __future__ import annotations

import importlib
import sys

import typer

from emflow.errors import EmflowError

app = typer.Typer(
    name="emflow",
    help="Align and ingest EM slice stacks into multiscale neuroglancer precomputed and OME-Zarr volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ("run", "validate", "plan", "demo", "serve", "status")
for _name in COMMAND_MODULES:
    importlib.import_module(f"emflow.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning emflow errors into one line and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except EmflowError as exc:
        print(f"emflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("emflow: interrupted; the run can be resumed with the same command", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer/click exit paths
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
