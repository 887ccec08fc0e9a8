"""Every registered backend (builtins and any installed plugin) against the contract suite."""

from __future__ import annotations

from typing import Any

import pytest

from achihuo_mini.testing import BackendContract

from .conftest import backend_params


class TestBackendContract(BackendContract):
    @pytest.fixture(params=backend_params())
    def backend_name(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def backend_options(self, backend_name: str, backend_options_for: Any) -> dict[str, Any]:
        return dict(backend_options_for(backend_name))
