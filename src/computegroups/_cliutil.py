"""What every ``computegroups`` command shares: exit codes, one-line errors, JSON or table output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from computegroups.errors import (
    ComputeGroupsError,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
)

__all__ = ["EXIT_CODES", "emit", "exit_code", "fail", "run"]

#: Exit code per error class; anything else that the library raises on purpose is 1.
EXIT_CODES: dict[type[ComputeGroupsError], int] = {
    InvalidRequestError: 2,
    NotFoundError: 2,
    InsufficientResourcesError: 3,
    ConflictError: 4,
}

T = TypeVar("T")


def exit_code(exc: ComputeGroupsError) -> int:
    """The exit code for a library error."""
    return next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)


def fail(message: str, code: int) -> NoReturn:
    """Print one line on stderr and exit."""
    click.echo(f"computegroups: {message}", err=True)
    sys.exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning library errors into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except ComputeGroupsError as exc:
        fail(str(exc), exit_code(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """Print ``data`` as JSON, or call ``human`` to print it for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human()
