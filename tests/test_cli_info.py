"""`k2 info`: preset configuration and exact counts, built on the meta device."""

from __future__ import annotations

import json

import pytest

from k2.cli import main


def test_info_kimi_k2_reports_the_exact_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "kimi-k2"]) == 0
    out = capsys.readouterr().out
    assert "1,026,408,209,408" in out
    assert "32.86B" in out
    assert '"deepseek_v3"' in out


def test_info_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "kimi-k2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_parameters"] == 1_026_408_209_408
    assert info["active_parameters"] == 32_861_477_888
    assert info["config"]["n_routed_experts"] == 384


def test_info_rejects_an_unknown_preset() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--preset", "nope"])
    assert exit_info.value.code == 2
