"""The one way the relay starts background tasks.

:class:`TaskSet` keeps a strong reference to every task it spawns (asyncio
only keeps weak ones), forgets it when it finishes, and logs any failure
other than cancellation, so nothing is fire-and-forget and no error is
silently dropped.

Concurrency model: used from the event loop thread only. ``cancel_all``
cancels and then awaits every task, so on return none is still running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    """A named set of running tasks."""

    def __init__(self, name: str, *, logger: logging.Logger) -> None:
        self._name = name
        self._logger = logger
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._logger.error("%s: task %s failed", self._name, task.get_name(), exc_info=exc)

    async def cancel_all(self) -> None:
        """Cancel every task and wait until all have finished."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
