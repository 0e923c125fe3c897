"""Process-level set-up of the daemon's entry points."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from egressd import daemon
from egressd.settings import Settings


def test_the_loop_starts_with_start_up_objects_out_of_the_collectors_sight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection must not walk every module, class and route on the loop's time."""
    seen: dict[str, int] = {}

    def fake_uvicorn(app: Any, **_: Any) -> None:
        seen["frozen"] = gc.get_freeze_count()
        seen["still_tracked"] = len(gc.get_objects(generation=2))

    monkeypatch.setattr(daemon, "_run_uvicorn", fake_uvicorn)
    try:
        daemon.run_api(Settings(data_dir=tmp_path), host="127.0.0.1", port=0)
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 50_000  # the app, SQLAlchemy, FastAPI, ... as built at start-up
    assert seen["still_tracked"] < seen["frozen"] // 100
