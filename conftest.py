"""pytest's root: the shared fixtures (tests/fixtures.py) serve tests/ and every method's own tests
(methods/<name>/tests/), so that adding a tested method is one directory."""
pytest_plugins = ["tests.fixtures"]
