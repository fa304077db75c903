"""The shipped YAML tables read the same through the fast loader as through PyYAML's own safe loader."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from moecap.analyze.specs.gpu import BUNDLED_YAML_LOADER


@pytest.mark.parametrize(
    ("package", "name"),
    [("moecap.analyze.specs.data", "gpus.yaml"), ("moecap.analyze.cost.data", "cost_constants.yaml")],
)
def test_bundled_tables_load_as_safe_load_reads_them(package: str, name: str) -> None:
    text = resources.files(package).joinpath(name).read_text("utf-8")
    fast, plain = yaml.load(text, Loader=BUNDLED_YAML_LOADER), yaml.safe_load(text)
    assert fast == plain and repr(fast) == repr(plain)  # same values, types and key order


def test_the_fast_loader_builds_no_python_objects() -> None:
    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=BUNDLED_YAML_LOADER)
