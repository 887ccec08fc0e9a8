# tests/test_contract.py
import pytest
from achihuo_mini.testing import BackendContract


class TestFileStore(BackendContract):
    @pytest.fixture
    def backend_name(self):
        return "filestore"

    @pytest.fixture
    def backend_options(self, tmp_path):
        return {"root": tmp_path}
