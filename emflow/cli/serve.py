"""``emflow serve``: serve an output folder over HTTP with CORS, for neuroglancer."""

from __future__ import annotations

import functools
import http.server
import json
import urllib.parse
from pathlib import Path
from typing import Annotated

import typer


class _CorsHandler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


def neuroglancer_link(base_url: str, directory: Path) -> str:
    """A neuroglancer demo-app URL with one layer per volume found in ``directory``."""
    layers = []
    for p in sorted(directory.iterdir()):
        if (p / "info").is_file():
            layers.append({"type": "image", "source": f"precomputed://{base_url}/{p.name}", "name": p.name})
        elif (p / "zarr.json").is_file() or (p / ".zattrs").is_file():
            scheme = "zarr3" if (p / "zarr.json").is_file() else "zarr2"
            layers.append({"type": "image", "source": f"{scheme}://{base_url}/{p.name}", "name": p.name})
    state = {"layers": layers, "layout": "4panel"}
    return "https://neuroglancer-demo.appspot.com/#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


def serve(
    directory: Annotated[Path, typer.Argument(help="output_dir of a run")],
    port: Annotated[int, typer.Option(help="port on localhost")] = 8000,
) -> None:
    """Serve DIRECTORY at http://localhost:PORT with CORS and print a neuroglancer link."""
    from emflow.errors import OutputError

    if not directory.is_dir():
        raise OutputError(f"{directory} is not a directory; give the output_dir of a run")
    handler = functools.partial(_CorsHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    base = f"http://localhost:{port}"
    typer.echo(f"serving {directory} at {base} (Ctrl-C to stop)\nneuroglancer: {neuroglancer_link(base, directory)}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
