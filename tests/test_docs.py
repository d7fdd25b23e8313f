"""The documentation site builds with no warning, its configuration reference lists every key, the README is short."""

import dataclasses
import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO
from eatdist.config import Config

pytest.importorskip("mkdocs")


def reference_module():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_key(cls=Config, prefix=""):
    """Each leaf key of the config dataclasses, walked here independently of the generator."""
    found = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            found += every_key(type(default), f"{prefix}{field.name}.")
        else:
            found.append(f"{prefix}{field.name}")
    return found


def test_configuration_reference_lists_every_key_with_a_description():
    module = reference_module()
    rendered = module.render()
    keys = every_key()
    assert len(keys) > 80
    for key in keys:
        assert f"| `{key}` |" in rendered, key
    described = {key: comment for key, _, _, comment in module.keys()}
    assert sorted(described) == sorted(keys)
    assert all(described.values()), [k for k, c in described.items() if not c]
    assert set(module.MORE) <= set(keys)  # no description of a key that is gone


@pytest.mark.slow
def test_site_builds_strict_with_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    page = (site / "configuration" / "index.html").read_text()
    for key in every_key():
        assert f"<code>{key}</code>" in page, key
    api = (site / "api" / "index.html").read_text()
    assert 'id="eatdist.api.load_model"' in api and "hf-hub:org/name" in api  # from the docstrings
    assert ":meth:" not in api and ":func:" not in api  # Sphinx roles shown as plain code
    assert "Cores per GPU" in (site / "launching" / "index.html").read_text()  # launch/README.md itself


def test_readme_fits_two_screens():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200
