"""Retrying with exponential backoff and jitter, in one place (``stamina``, on ``tenacity``).

An exception opts in by its attributes, so this module knows no backend:

- ``transient`` (bool): True when the same call may succeed if made again (a refused or
  dropped connection, a timeout, HTTP 429 or 503). Anything else is raised at once.
- ``retry_after_s`` (float or None): how long the server asked to be left alone (its
  ``Retry-After`` header, read with :func:`retry_after_s`); that wait replaces the
  backoff for that attempt.

Calls are retried with :func:`retrying` (sync ``for`` or ``async for``)::

    for attempt in retrying(attempts=4, timeout_s=15):
        with attempt:
            return call()

Waits that are scheduled rather than slept (a worker restarted later by a polling
loop) take their length from :func:`backoff_s`, the same curve.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from typing import Any

import stamina

__all__ = ["RETRY_AFTER_MAX_S", "backoff_s", "is_transient", "retry_after_s", "retrying"]

#: The longest ``Retry-After`` honoured; a server asking for more is waited on this long.
RETRY_AFTER_MAX_S = 60.0


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header value asks for: delta-seconds or an HTTP date (RFC 9110).

    None when absent or unreadable; never negative; at most :data:`RETRY_AFTER_MAX_S`.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_S)


def is_transient(exc: Exception) -> bool | float:
    """stamina's backoff hook: False to raise ``exc``, True to back off, a float to wait that long."""
    if not getattr(exc, "transient", False):
        return False
    after = getattr(exc, "retry_after_s", None)
    return float(after) if after is not None else True


def retrying(
    *,
    attempts: int | None = 4,
    timeout_s: float | None = 15.0,
    wait_initial_s: float = 0.1,
    wait_max_s: float = 5.0,
    wait_jitter_s: float = 0.5,
) -> Any:
    """Attempts of a call: ``wait_initial_s * 2**(n-1)`` plus up to ``wait_jitter_s`` between them.

    At most ``attempts`` tries within ``timeout_s`` seconds (None: no bound); exceptions
    that :func:`is_transient` does not retry are raised at once, the last one otherwise.
    """
    return stamina.retry_context(
        on=is_transient,
        attempts=attempts,
        timeout=timeout_s,
        wait_initial=wait_initial_s,
        wait_max=wait_max_s,
        wait_jitter=wait_jitter_s,
    )


def backoff_s(failures: int, *, initial_s: float, max_s: float, jitter: float = 0.0) -> float:
    """The wait after the ``failures``-th failure in a row: ``initial_s * 2**(failures-1)``, at most ``max_s``.

    ``jitter``: a fraction of the wait added at random (0.1: up to 10% more), so that many
    waiters do not come back at the same moment; the result stays at most ``max_s``.
    """
    base = initial_s * 2.0 ** min(max(0, failures - 1), 60) if initial_s > 0 else 0.0
    base = min(max_s, base)
    if jitter > 0 and base > 0:
        base = min(max_s, base * (1.0 + random.uniform(0.0, jitter)))
    return float(base)
