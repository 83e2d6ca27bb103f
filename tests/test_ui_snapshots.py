"""What people see of the simulator UI, as SVG snapshots: a change to it is a reviewed change.

`pytest tests/test_ui_snapshots.py --snapshot-update` writes them again after a wanted change
(review the SVGs under tests/__snapshots__/ in the diff)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_textual_snapshot import SVGImageExtension  # type: ignore[import-untyped]
from syrupy.assertion import SnapshotAssertion
from textual.widgets import Static
from uikit import app_of, running_ui, ui_kit

pytestmark = pytest.mark.e2e


async def test_the_main_screen_and_the_help_screen(bank_dir: Path, snapshot: SnapshotAssertion,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    svg = snapshot.use_extension(SVGImageExtension)
    monkeypatch.delenv("NO_COLOR", raising=False)  # the picture in colour wherever it runs
    async with running_ui(ui_kit(bank_dir)) as pilot:
        ui = app_of(pilot)
        ui.theme = "textual-dark"  # whatever TEXTUAL_THEME says here
        # A bank at rest: fixed codes, bank L1, the three start-up events, nothing selected
        # but compartment 1, no status line.
        await pilot.pause()
        assert svg(name="main") == ui.export_screenshot(title="lockerd demo")
        await pilot.press("question_mark")
        await pilot.pause()
        text = str(ui.screen.query_one("#help-text", Static).content)
        for binding in ui._bindings_list():  # every key the footer shows, with what it does
            assert not binding.show or (binding.tooltip and binding.tooltip in text)
        assert "0-9 * #" in text
        assert svg(name="help") == ui.export_screenshot(title="lockerd demo")
        await pilot.press("escape")
        assert ui.screen is ui.screen_stack[0]
