import pytest


def pytest_collection_modifyitems(items):
    """Everything here runs whole commands: marked slow (``-m "not slow"`` skips it)."""
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
