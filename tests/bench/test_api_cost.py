"""bench/api_cost.py runs: both configurations start, every cell answers with the tokens asked, figures come out.

Tiny sizes (a smoke run): the figures themselves are not judged, only that they are there. Marked slow: two
server starts (transformers' and vLLM's imports) take 15-35 s on the 2-core machine, no engine needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.results
from bench import api_cost


@pytest.mark.slow
def test_api_cost_meter_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.results, "RESULTS", tmp_path)
    data = api_cost.main(["--requests", "6", "--clients", "2", "--tokens", "4", "--passes", "1", "--label", "api_cost"])
    assert data is not None
    assert (tmp_path / "api_cost.json").is_file()
    assert set(data["configs"]) == {"full", "bare"}
    for result in data["configs"].values():
        cells = result["cells"]
        assert set(cells) == {"stream-o4", "json-o4", "stream-o1", "json-o1", "stream-o4-c1"}
        for name, cell in cells.items():
            assert cell["errors"] == 0, cell["first_error"]
            assert cell["completion_tokens_mean"] == (1 if "-o1" in name else 4)
            assert cell["api_us_per_request"] > 0
        assert set(result["derived"]) == {
            "stream_us_per_request",
            "stream_us_per_chunk",
            "json_us_per_request",
            "json_us_per_token",
            "ttft_1_client_ms",
        }
        assert result["derived"]["ttft_1_client_ms"] > 0
    pytest.importorskip("matplotlib")
    from bench.plot import plot

    assert plot(["api_cost"], out_dir=tmp_path) == [tmp_path / "api_cost.png"]
