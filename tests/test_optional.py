"""k2.optional.require: a missing optional package names itself and its extra."""

from __future__ import annotations

import json

import pytest

from k2.errors import K2Error, MissingDependencyError
from k2.optional import require


def test_require_returns_the_module() -> None:
    assert require("json", extra="x", purpose="a test") is json


def test_a_missing_package_names_the_package_the_extra_and_the_purpose() -> None:
    with pytest.raises(MissingDependencyError) as info:
        require("k2_no_such_package_xyz.sub", extra="agentic", purpose="the MCP bridge")
    message = str(info.value)
    assert "'k2_no_such_package_xyz'" in message
    assert "k2-train[agentic]" in message and "the MCP bridge" in message
    assert isinstance(info.value, K2Error) and isinstance(info.value, ImportError)
