"""The API matches its documentation: the README's "From Jupyter" code runs as written, every
function docs/api.md lists exists with the parameters it shows, typed and documented, and
``plan()`` uses an alignment's frame when there is one."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import emflow
from emflow.align.match import PairResult
from emflow.enhance import clahe
from emflow.testing import synthetic_slices, write_stack
from emflow.testing.misalign import misaligned_slices

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
API_DOC = (ROOT / "docs" / "api.md").read_text()
HEADING = re.compile(r"^### `([\w.]+)\((.*)\) -> (.+)`$", re.M)


def resolve(dotted: str):
    """``emflow.align.match.match`` → the object (longest importable module prefix)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def doc_params(text: str) -> list[tuple[str, str | None]]:
    """``a, *, b=(0, 0), c=None, **kw`` → [(a, None), (b, '(0, 0)'), (c, 'None'), (kw, None)]."""
    args = ast.parse(f"def f({text}): pass").body[0].args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, d) for a, d in zip(positional, defaults, strict=True)]
    out += list(zip((a.arg for a in args.kwonlyargs), args.kw_defaults, strict=True))
    if args.kwarg is not None:
        out.append((args.kwarg.arg, None))
    return [(n, None if d is None else ast.unparse(d)) for n, d in out]


def test_every_documented_function_exists_as_documented():
    entries = HEADING.findall(API_DOC)
    assert len(entries) >= 15
    for dotted, params, _ret in entries:
        fn = resolve(dotted)
        sig = inspect.signature(fn)
        real = {
            n: p
            for n, p in sig.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        shown = doc_params(params)
        assert [n for n, _ in shown if n != "kw"] == list(real), dotted  # same names, same order
        for name, default in shown:
            if name == "kw":
                continue
            p = real[name]
            if default is None:
                assert p.default is p.empty, f"{dotted}: {name} has a default"
                continue
            try:
                value = ast.literal_eval(default)
            except ValueError:  # e.g. MatchConfig(): compare the type only
                assert type(p.default).__name__ == default.split("(")[0], (dotted, name)
            else:
                assert p.default == value, (dotted, name, p.default, value)
        # typed and documented
        assert all(p.annotation is not p.empty for p in sig.parameters.values()), dotted
        assert sig.return_annotation is not sig.empty, dotted
        assert (fn.__doc__ or "").strip(), dotted


def test_public_names_are_documented():
    documented = {d for d, _, _ in HEADING.findall(API_DOC)}
    for name in emflow.__all__:
        obj = getattr(emflow, name)
        if inspect.isfunction(obj):
            assert f"emflow.{name}" in documented, name


def test_clahe_on_a_whole_slice_defaults_to_the_slice_as_frame():
    img = next(iter(synthetic_slices((1, 300, 420), seed=3)))
    whole = clahe(img, clip_limit=0.03, kernel_size_px=128)
    explicit = clahe(
        img, origin_yx=(0, 0), frame_shape_yx=img.shape, clip_limit=0.03, kernel_size_px=128
    )
    np.testing.assert_array_equal(whole, explicit)
    assert whole.std() > img.std()
    tile = clahe(
        img[100:300, 150:420], origin_yx=(100, 150), frame_shape_yx=img.shape, clip_limit=0.03,
        kernel_size_px=128,
    )  # fmt: skip
    np.testing.assert_array_equal(tile[192:, 192:], whole[292:, 342:])  # beyond the 1.5 K halo


@pytest.mark.integration
def test_readme_jupyter_code_runs_as_written(tmp_path, monkeypatch, caplog):
    recipe_yaml = re.search(r"```yaml\n(# recipe\.yaml.*?)```", README, re.S).group(1)
    data = yaml.safe_load(recipe_yaml)
    data["source"]["z_stop"] = 6  # the README's stack has 2000 slices: keep its first 6
    data["align"]["frame"] = "union"  # a frame that grows with the alignment: plan() follows it
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    write_stack(
        misaligned_slices(synthetic_slices((6, 320, 320), seed=8), seed=8),
        tmp_path / "raw",
        pattern="section_%05d.png",
    )
    code = re.search(r"## From Jupyter\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="emflow")
    before = emflow.plan("recipe.yaml")
    assert before.frame_shape_yx == (320, 320)
    assert "the run plans again after its solve" in caplog.text  # says the frame may grow
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    result = ns["result"]
    frame = result.alignment.frame_shape_yx
    assert frame != (320, 320)  # the misaligned slices widen the frame
    assert ns["em"].shape == (6, *frame) and ns["em"].dims == ("z", "y", "x")
    assert ns["xz"].shape == (6, frame[1])
    assert isinstance(ns["pair"], PairResult) and ns["pair"].ok
    assert ns["tuned"].shape == (320, 320) and ns["tuned"].dtype == np.uint8
    # plan() now knows the aligned frame: from the run folder, an Alignment, a path, a result
    saved = result.run_dir / "alignment.json"
    assert emflow.plan("recipe.yaml").frame_shape_yx == frame
    assert emflow.plan("recipe.yaml", alignment=result.alignment).frame_shape_yx == frame
    assert emflow.plan("recipe.yaml", alignment=saved).frame_shape_yx == frame
    assert emflow.plan("recipe.yaml", alignment=result).frame_shape_yx == frame
    assert emflow.plan("recipe.yaml", alignment=result.alignment) == result.plan


def test_import_emflow_stays_light():
    """The notebook API adds no heavy import to ``import emflow`` (Dask, tensorstore, xarray
    and IPython load when a run, a plan or emflow.open needs them)."""
    import subprocess
    import sys

    code = (
        "import sys, emflow\n"
        "heavy = ('dask', 'distributed', 'tensorstore', 'xarray', 'IPython', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
