"""The README is the front door: its recipe validates and its exit-code table is the one emflow keeps."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from emflow import errors
from emflow.recipe import recipe_from_dict

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_recipe_is_valid_and_aligns_by_default():
    block = re.search(r"```yaml\n(# recipe\.yaml.*?)```", README, re.S).group(1)
    data = yaml.safe_load(block)
    assert recipe_from_dict(data).align.enabled
    del data["align"]
    assert recipe_from_dict(data).align.enabled  # on unless the recipe says align: false
    assert not recipe_from_dict({**data, "align": False}).align.enabled


def test_readme_exit_codes_are_the_ones_emflow_uses():
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README, re.M))
    assert set(rows) == {"0", "1", "2", "3", "130"}
    assert int("2") == errors.EmflowError.exit_code == errors.EXIT_BAD_INPUT
    assert errors.NoSpaceError.exit_code == errors.EXIT_INCOMPLETE == 3
    from emflow.lattice import IncompleteRun

    assert IncompleteRun.exit_code == 3 and errors.EXIT_INTERRUPTED == 130
    assert errors.INTERRUPTED_MESSAGE in rows["130"]
