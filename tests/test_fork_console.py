"""The console's fork and snapshot buttons and its snapshot list, in headless Chromium against a
real manager (the fixtures of test_console.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from testing.harness import ManagerProc
from tests.test_console import browser, context, logged_in, manager, new_session  # noqa: F401  (fixtures)
from tests.test_snapshots import remove_seeds


@pytest.fixture(autouse=True)
def no_seed_left(manager: ManagerProc) -> Iterator[None]:  # noqa: F811
    yield
    remove_seeds(manager.cfg["redis"]["key_prefix"])


def test_fork_and_snapshot_buttons(manager: ManagerProc, context) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    _, node_id = new_session(manager.url)
    page = logged_in(context, manager.console_url)
    page.goto(manager.console_url + f"/ui/#/session/{node_id}")
    page.wait_for_selector(f"#session-id:has-text('{node_id}')")
    page.fill("#fork-count", "2")
    page.click("#fork")
    try:
        page.wait_for_selector("#copy-result a.node >> nth=1", timeout=120_000)
    except PlaywrightTimeout:
        raise AssertionError(f"no copies: the page says {page.text_content('#copy-result')!r}; the manager's "
                             f"log ends:\n{manager.logs()[-4000:]}") from None
    copies = page.eval_on_selector_all("#copy-result a.node", "els => els.map(e => e.dataset.node)")
    assert len(copies) == 2 and node_id not in copies

    page.fill("#snapshot-name", "from-console")
    page.click("#snapshot")
    page.wait_for_selector("#copy-result:has-text('snapshot from-console saved')", timeout=60_000)

    page.goto(manager.console_url + "/ui/#/sessions")
    page.click("#list-snapshots")
    page.wait_for_selector("#snapshots td:has-text('from-console')")
    page.click("#snapshots button[data-action='delete-snapshot:from-console']")
    page.click("#snapshots button[data-action='delete-snapshot:from-console']")  # confirm
    page.wait_for_selector("#snapshots:has-text('no snapshots')")
