"""Supported-version handling (no vLLM needed)."""

from __future__ import annotations

import pytest

from moecap.collect.engines.vllm import compat


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.26.0", (0, 26, 0)),
        ("0.26.0+cu130", (0, 26, 0)),
        ("0.34.0rc1", (0, 34, 0)),
        ("0.27.1.dev12+g1", (0, 27, 1)),
        ("1.0", (1, 0, 0)),
    ],
)
def test_parse_version(text, parsed):
    assert compat.parse_version(text) == parsed


@pytest.mark.parametrize("version", ["0.26.0", "0.26.0+cu130", "0.29.3", "0.33.0"])
def test_inside_the_range(version):
    assert compat.version_problem(version) is None


@pytest.mark.parametrize("version", ["0.25.9", "0.33.1", "0.34.0", "1.0.0", "banana"])
def test_outside_the_range_is_one_clear_line(version):
    problem = compat.version_problem(version)
    assert problem and "0.26.0 – 0.33.0" in problem and "\n" not in problem


def test_profiles_by_release():
    assert compat.profile_for("0.26.0").name == "0.26"
    assert compat.profile_for("0.30.1").name == "0.26"  # in between: the defensive, older profile
    assert compat.profile_for("0.33.0").name == "0.33"
    assert compat.profile_for("0.33.0").new_request_prompt_len
    assert not compat.profile_for("0.26.0").new_request_prompt_len


def test_check_version(monkeypatch):
    from moecap.collect.engines.vllm import adapter
    from moecap.collect.errors import CollectError

    monkeypatch.setattr(compat, "installed_version", lambda: "0.35.0")
    assert "outside" in adapter.check_version(strict=False)
    with pytest.raises(CollectError, match="--strict-engine"):
        adapter.check_version(strict=True)
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    with pytest.raises(CollectError, match="not installed"):
        adapter.check_version(strict=False)
    monkeypatch.setattr(compat, "installed_version", lambda: "0.26.0")
    assert adapter.check_version(strict=True) is None
