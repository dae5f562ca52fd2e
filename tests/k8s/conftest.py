"""Fixtures of the k8s tests: each test taking `docs` runs once per overlay (dev, prod)."""

from __future__ import annotations

from typing import Any

import pytest
from k8s_manifests import OVERLAYS, render


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> list[dict[str, Any]]:
    return render(overlay)
