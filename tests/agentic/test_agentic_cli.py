"""`k2 env list|show|play`."""

from __future__ import annotations

import io

from k2.cli import main


def test_list_and_show(capsys) -> None:
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("bank", "calendar", "contacts", "device", "notes", "shop"):
        assert name in out
    assert main(["env", "show", "bank"]) == 0
    out = capsys.readouterr().out
    assert "transfer(from_account, to_account, amount_cents, memo?)  [write]" in out
    assert '"id": "bank-move-savings"' in out and "Identify the customer" in out


def test_unknown_domain_and_task_are_errors(capsys) -> None:
    assert main(["env", "show", "nope"]) == 1
    assert "unknown domain 'nope'" in capsys.readouterr().err
    assert main(["env", "play", "bank", "--task", "nope"]) == 1
    assert "no task 'nope'" in capsys.readouterr().err


def test_play_a_task_by_hand(monkeypatch, capsys) -> None:
    lines = iter([
        "What is your customer id and account?",
        "/tools",
        "/call transfer {not json}",
        '/call get_account {"account_id": "acc-1002"} ;; /call transfer {"from_account": "acc-1002", "to_account": "acc-1001", "amount_cents": 150000}',
        "Done: your savings hold 10,500.00 now.",
    ])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["env", "play", "bank", "--task", "bank-move-savings"]) == 0
    out = capsys.readouterr().out
    assert "user> My customer id is c100. From savings acc-1002 to checking acc-1001." in out
    assert "not valid JSON" in out  # a bad call is reported, the episode goes on
    assert "tool functions.transfer:2>" in out
    assert "episode over (user_stop)" in out and "reward: 1.0" in out
