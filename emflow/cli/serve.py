"""``emflow serve``: serve an output folder over HTTP with CORS, for neuroglancer."""

from __future__ import annotations

import functools
import json
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import http.server


@functools.cache
def _handler_class() -> type:
    """The request handler class; made on first use: ``http.server`` (with ``http.client`` and
    ``email``, ~25 ms) is imported by ``emflow serve``/``emflow view``, not by every command."""
    import http.server

    class _CorsHandler(http.server.SimpleHTTPRequestHandler):
        """Static files with CORS and single byte-range requests (neuroglancer reads shards by
        range)."""

        def end_headers(self) -> None:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "Range")
            self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length")
            self.send_header("Accept-Ranges", "bytes")
            super().end_headers()

        def do_OPTIONS(self) -> None:
            self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            spec = self.headers.get("Range", "")
            path = Path(self.translate_path(self.path))
            if not spec.startswith("bytes=") or not path.is_file():
                return super().do_GET()
            size = path.stat().st_size
            first, _, last = spec[len("bytes=") :].split(",")[0].strip().partition("-")
            try:
                if first:
                    start, stop = int(first), (int(last) if last else size - 1)
                else:  # suffix range: the last N bytes
                    start, stop = max(0, size - int(last)), size - 1
            except ValueError:
                return super().do_GET()
            stop = min(stop, size - 1)
            if start > stop:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return None
            with open(path, "rb") as fh:
                fh.seek(start)
                body = fh.read(stop - start + 1)
            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{stop}/{size}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    return _CorsHandler


def neuroglancer_link(base_url: str, directory: Path) -> str:
    """A neuroglancer demo-app URL with one layer per volume found in ``directory``.

    Sources use :func:`emflow.cli.summary.neuroglancer_source` (the one scheme per format).
    """
    from emflow.cli.summary import neuroglancer_source

    layers = []
    for p in sorted(directory.iterdir()):
        src = neuroglancer_source(base_url, p) if p.is_dir() else None
        if src is not None:
            layers.append({"type": "image", "source": src, "name": p.name})
    state = {"layers": layers, "layout": "4panel"}
    return "https://neuroglancer-demo.appspot.com/#!" + urllib.parse.quote(
        json.dumps(state, separators=(",", ":"))
    )


def make_server(directory: Path, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``directory`` on 127.0.0.1:port (port 0 = any free port)."""
    import http.server

    handler = functools.partial(_handler_class(), directory=str(directory))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(
    directory: Annotated[Path, typer.Argument(help="output_dir of a run")],
    port: Annotated[int, typer.Option(help="port on localhost")] = 8000,
) -> None:
    """Serve DIRECTORY at http://localhost:PORT with CORS and print a neuroglancer link."""
    from emflow.errors import OutputError

    if not directory.is_dir():
        raise OutputError(f"{directory} is not a directory; give the output_dir of a run")
    from emflow.cli.summary import port_forward_hint

    try:
        server = make_server(directory, port)
    except OSError as exc:
        raise OutputError(
            f"cannot serve on port {port} ({exc.strerror or exc}); choose another with --port"
        ) from None
    port = server.server_address[1]
    base = f"http://localhost:{port}"
    typer.echo(
        f"serving {directory} at {base} (Ctrl-C to stop)\nneuroglancer: {neuroglancer_link(base, directory)}"
    )
    hint = port_forward_hint(port)
    if hint:
        typer.echo(hint)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
