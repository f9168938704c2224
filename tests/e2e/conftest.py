"""Fixtures of the end-to-end tests: the Chromium browser (tests/browser.py)."""

from tests.browser import browser  # noqa: F401  (a fixture, found by name)
