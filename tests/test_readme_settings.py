"""The README's configuration table documents every setting, with the default the code uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from producer.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
# A table row: | `CLIPFLEET_NAME` | default | meaning |
ROWS = {name: default for name, default in re.findall(r"^\| `(CLIPFLEET_[A-Z0-9_]+)` \| ([^|]+) \|", README, re.M)}


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_setting_has_readme_row(field: str) -> None:
    assert f"CLIPFLEET_{field.upper()}" in ROWS


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_readme_default_matches_code(field: str) -> None:
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    documented = ROWS[f"CLIPFLEET_{field.upper()}"]
    if default is None or default == []:
        assert documented.startswith("unset")
    elif isinstance(default, bool):
        assert documented.strip() == f"`{str(default).lower()}`"
    else:
        assert documented.split()[0].strip("`") == str(default).removesuffix(".0")
