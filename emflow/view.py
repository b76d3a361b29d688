"""Look at outputs from a notebook: serve them over HTTP (CORS) for neuroglancer, from the kernel.

:func:`serve` is ``emflow serve`` in a background thread: it returns a :class:`Served`
handle whose ``source(name)`` is the neuroglancer data source of an output
(``precomputed://http://127.0.0.1:PORT/em``) and whose HTML shows a neuroglancer link.
With the ``neuroglancer`` package installed, :meth:`Served.viewer` opens its Python
viewer on the outputs.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emflow.errors import OutputError

if TYPE_CHECKING:
    from emflow.pipeline import RunResult


def _scheme(path: Path) -> str | None:
    if (path / "info").is_file():
        return "precomputed"
    if (path / "zarr.json").is_file():
        return "zarr3"
    if (path / ".zattrs").is_file():
        return "zarr2"
    return None


@dataclass
class Served:
    """A running HTTP server for one output_dir (stop it with :meth:`stop`)."""

    directory: Path
    url: str
    _server: Any = field(repr=False, default=None)
    _thread: threading.Thread | None = field(repr=False, default=None)

    @property
    def outputs(self) -> list[str]:
        """Volume folders served (names)."""
        return sorted(p.name for p in self.directory.iterdir() if _scheme(p) is not None)

    def source(self, name: str) -> str:
        """neuroglancer data source of output ``name``, e.g. ``precomputed://http://…/em``."""
        scheme = _scheme(self.directory / name)
        if scheme is None:
            raise OutputError(
                f"{self.directory / name} is not a volume; served outputs: {', '.join(self.outputs)}"
            )
        return f"{scheme}://{self.url}/{name}"

    def neuroglancer_link(self) -> str:
        """A neuroglancer-demo.appspot.com link with every served output as a layer."""
        from emflow.cli.serve import neuroglancer_link

        return neuroglancer_link(self.url, self.directory)

    def viewer(self, layout: str = "4panel") -> Any:
        """neuroglancer's Python viewer (``pip install neuroglancer``) on every served output."""
        import neuroglancer

        neuroglancer.set_server_bind_address("127.0.0.1")
        v = neuroglancer.Viewer()
        with v.txn() as s:
            for name in self.outputs:
                s.layers[name] = neuroglancer.ImageLayer(source=self.source(name))
            s.layout = layout
        return v

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _repr_html_(self) -> str:
        rows = "".join(f"<li><code>{html.escape(self.source(n))}</code></li>" for n in self.outputs)
        link = html.escape(self.neuroglancer_link())
        return (
            f"<div>serving <code>{html.escape(str(self.directory))}</code> at "
            f"<a href='{html.escape(self.url)}' target='_blank'>{html.escape(self.url)}</a>"
            f" (CORS) — <a href='{link}' target='_blank'>open in neuroglancer</a>"
            f"<ul>{rows}</ul></div>"
        )


def serve(source: RunResult | str | Path, port: int = 0) -> Served:
    """Serve a run's ``output_dir`` (a RunResult, the folder, or a volume in it) on 127.0.0.1.

    ``port=0`` picks a free port. The server runs in a daemon thread of this process.
    """
    from emflow.cli.serve import make_server

    if hasattr(source, "output_paths"):
        paths = list(source.output_paths.values())
        directory = Path(paths[0]).parent if paths else Path(source.run_dir).parent
    else:
        directory = Path(source)
        if _scheme(directory) is not None:  # a volume: serve its folder
            directory = directory.parent
    if not directory.is_dir():
        raise OutputError(f"{directory} is not a directory; give the output_dir of a run")
    server = make_server(directory.resolve(), port)
    thread = threading.Thread(target=server.serve_forever, name="emflow-serve", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return Served(directory.resolve(), url, server, thread)
