"""The recipe's stage table and report.html: the right numbers, one self-contained page, model
output escaped, and a page that renders (a headless Chromium screenshot)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from k2.recipe.report import markdown_table, table_rows, write_report, write_table

from recipe_fakes import EPISODE, HOSTILE, SETTINGS, fake_out


class Page(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_table_holds_each_stage_figures(tmp_path: Path) -> None:
    plan, markers, figures, _ = fake_out(tmp_path)
    rows = {r["stage"]: r for r in table_rows(plan, markers, figures, tmp_path)}
    assert rows["train"]["val_loss"] == 3.9 and rows["train"]["seconds"] == 10.0
    assert rows["sft"]["next_call_exact_match"] == 0.25 and rows["sft"]["episode_success"] == 0.125
    assert rows["rl"]["arithmetic_accuracy"] == 0.3125 and rows["rl"]["critic_agreement"] == 0.75
    assert rows["train"]["critic_agreement"] is None  # no critic before RL
    assert rows["synth"]["output"] == "400 trajectories (360 train, 40 held-out) of 450 episodes"
    assert rows["rl"]["output"] == "10 steps; reward 0.60 → 1.00"
    text = write_table(tmp_path, plan, markers, figures)
    lines = text.splitlines()
    assert lines[2].startswith("| train | 10.0 | 3.900 | +0.200 | 50.0 % | 0.0 % | 100.0 % | 0.0 % | 0.0 % | – |")
    assert lines[5].startswith("| rl | 40.0 | 4.050 | +0.050 | 50.0 % | 25.0 % | 100.0 % | 12.5 % | 31.2 % | 75.0 % |")
    assert "bigram 4.100" in text
    saved = json.loads((tmp_path / "stage_table.json").read_text())
    assert [r["stage"] for r in saved["rows"]] == ["train", "synth", "sft", "rl"]
    assert saved["baselines"] == {"unigram_nats": 6.5, "bigram_nats": 4.1}
    assert (tmp_path / "stage_table.md").read_text().strip() == text.strip()
    assert markdown_table([]).count("\n") == 1


def test_report_is_one_self_contained_page_with_model_output_escaped(tmp_path: Path) -> None:
    plan, markers, figures, record = fake_out(tmp_path)
    html = write_report(tmp_path, plan, markers, figures, record, SETTINGS).read_text(encoding="utf-8")
    page = parse(html)
    tags = [t for t, _ in page.tags]
    # No script, no external anything: every image is inline PNG, no link/iframe/object/style import.
    assert "script" not in tags and "<script" not in html.lower()
    for banned in ("link", "iframe", "object", "embed", "base"):
        assert banned not in tags, banned
    assert "http://" not in html and "https://" not in html and "@import" not in html and "url(" not in html
    for tag, attrs in page.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)  # no event handlers
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 4
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # The hostile reply and tool argument come out as text, not markup.
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html
    assert "&lt;/pre&gt;&lt;script&gt;x()&lt;/script&gt;" in html
    text = "".join(page.text)
    assert HOSTILE in text  # the reader sees exactly what the model wrote
    # The table, the curves and the episode.
    assert "What each stage changed" in text and "Curves" in text and "Agent episodes" in text
    assert "31.2 %" in text and "75.0 %" in text and "3.900" in text
    assert "transfer_funds" in text and '"amount": 20' in text and '{"ok": true, "balance": 180}' in text
    assert "Move 20 from savings to checking, please." in text
    assert "grade: success, reward 1.0, ended by user_stop" in " ".join(text.split())
    assert "after rl" in " ".join(text.split())
    assert html.count('class="episode') == 1  # report_episodes caps it; one episode recorded
    assert "Test CPU" in text and "4 of 4 stages finished" in text


def test_report_of_an_unfinished_recipe_says_what_is_missing(tmp_path: Path) -> None:
    plan, markers, figures, record = fake_out(tmp_path, rl_done=False)
    html = write_report(tmp_path, plan, markers, figures, record, SETTINGS).read_text(encoding="utf-8")
    text = " ".join("".join(parse(html).text).split())
    assert "3 of 4 stages finished" in text and "Interrupted during rl" in text and "not run yet" in text
    assert "after sft" in text  # episodes from the newest model that has them


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs chromium (make system-deps installs it)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.image import imread

    plan, markers, figures, record = fake_out(tmp_path)
    report = write_report(tmp_path, plan, markers, figures, record, SETTINGS)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,3200", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (3200, 1200)
    assert pixels.std() > 0.05  # not blank
    # Every band of the page down to the episodes has content: the header and table, the plots,
    # the episode (rendered on coloured backgrounds) — not one uniform colour.
    for top in (0, 800, 1600, 2400):
        band = pixels[top:top + 400]
        assert band.std() > 0.02, top
    colours = {tuple(c) for c in (pixels[::8, ::8] * 255).astype(np.uint8).reshape(-1, 3)}
    assert len(colours) > 50  # plots and text, not a flat page
