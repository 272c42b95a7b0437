"""One scale factor for every timeout in the test suite.

Each test's waits ("until this happens, at most N seconds") are written as ``scaled(N)`` or use
:data:`TIMEOUT`, so that a slow or loaded machine needs one setting, not an edit per file:

    TESSERA_TEST_TIMEOUT_SCALE=3 bash tests/run

Only upper bounds scale. Durations a test *asserts* (a heartbeat must come after one interval,
not before) are protocol facts and stay as written.
"""

from __future__ import annotations

import os

__all__ = ["SCALE", "TIMEOUT", "scaled"]


def _scale() -> float:
    raw = os.environ.get("TESSERA_TEST_TIMEOUT_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"TESSERA_TEST_TIMEOUT_SCALE must be a number, not {raw!r}") from None
    if value <= 0:
        raise SystemExit("TESSERA_TEST_TIMEOUT_SCALE must be positive")
    return value


#: Multiplies every timeout of the suite (``TESSERA_TEST_TIMEOUT_SCALE``, default 1).
SCALE = _scale()


def scaled(seconds: float) -> float:
    """``seconds`` as an upper bound on this machine."""
    return seconds * SCALE


#: The default wait for something a test expects to happen.
TIMEOUT = scaled(5.0)
