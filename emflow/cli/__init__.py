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
    except Exception as exc:
        if isinstance(exc, _usage_errors()):  # bad option or value: click prints usage + one line
            exc.show()
            return int(getattr(exc, "exit_code", 2) or 2)
        if isinstance(exc, _aborts()):
            return 1
        if type(exc).__name__ == "Exit" and hasattr(exc, "exit_code"):  # typer.Exit(code)
            return int(exc.exit_code)
        raise
    return 0


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Usage-error classes of the click that typer uses (vendored in newer typer, else click)."""
    kinds: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        kinds.append(typer.TyperException)
    try:
        import click

        kinds.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _aborts() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        kinds.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(kinds)


if __name__ == "__main__":
    sys.exit(main())
