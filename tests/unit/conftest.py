"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import diffusers
import pytest


@pytest.fixture(scope="module")
def quiet_diffusers() -> Iterator[None]:
    """diffusers' warnings (the missing safety checker and the like) off for a module's tests:
    not what they check. Use with `pytestmark = pytest.mark.usefixtures("quiet_diffusers")`."""
    previous = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(previous)
