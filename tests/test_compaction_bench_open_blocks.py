"""`python -m bench.compaction --max-open-blocks N`: every store a replay opens gets the option (both
baselines and every policy alike), and a run without it measures the engine's default. The diagnosis
in docs/compaction.md ("Open blocks: what bounds co-location with many writers") compares the two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import blockstore
from bench import compaction as bc
from bench.traces import generate


def _replay_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, max_open_blocks: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    real_open = blockstore.open

    def recording_open(path: Any, **kw: Any) -> Any:
        seen.append({k: v for k, v in kw.items() if k == "max_open_blocks"})
        return real_open(path, **kw)

    monkeypatch.setattr(blockstore, "open", recording_open)
    trace = generate("sessions", 0, 0.25)
    payloads = bc.Payloads(0, trace.summary()["max_record_bytes"])
    cell = bc.replay(trace, "full", block_size=256 * 1024, root=str(tmp_path), payloads=payloads, passes=4,
                     cold_samples=0, max_open_blocks=max_open_blocks)
    return seen, cell


def test_the_option_reaches_every_store_the_replay_opens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen, _cell = _replay_options(monkeypatch, tmp_path, 2)
    assert len(seen) == 2  # the replayed store and its reopen for the amplification figures
    assert all(s == {"max_open_blocks": 2} for s in seen)


def test_without_the_option_the_engine_default_is_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen, _cell = _replay_options(monkeypatch, tmp_path, None)
    assert seen and all(s == {} for s in seen)


def test_fewer_open_blocks_than_writers_spread_a_request_over_more_blocks(tmp_path: Path) -> None:
    """The effect the option exists to show: 24 concurrent sessions on 2 open blocks share them, and
    their requests touch more blocks than with a block each."""
    trace = generate("sessions", 0, 0.5)
    payloads = bc.Payloads(0, trace.summary()["max_record_bytes"])
    kw: dict[str, Any] = dict(block_size=1024 * 1024, root=str(tmp_path), payloads=payloads, passes=0, cold_samples=0)
    few = bc.replay(trace, "semantic-only", max_open_blocks=2, **kw)["blocks_per_request"]
    many = bc.replay(trace, "semantic-only", max_open_blocks=64, **kw)["blocks_per_request"]
    assert many < few


def test_a_bad_value_is_refused() -> None:
    with pytest.raises(SystemExit):
        bc.parse_args(["--quick", "--max-open-blocks", "0"])
