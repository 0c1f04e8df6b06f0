"""Uploading in a real browser (Chromium): the example contacts import, a real worker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_browser import DONE, base_url, browser, worker  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rules_dir(rules_dir):
    """The test forms plus the example contacts import."""
    shutil.copy(ROOT / "rules" / "contacts_import.yaml", rules_dir)
    return rules_dir


def test_a_person_uploads_a_csv_and_follows_its_import(browser, base_url, worker,  # noqa: F811
                                                       tmp_path):
    people = tmp_path / "people.csv"
    people.write_bytes(b"name,email\nAnn,ann@example.com\nBob,bob@example.com\n"
                       b"Bob again,bob@example.com\n")
    wrong = tmp_path / "notes.txt"
    wrong.write_text("not a spreadsheet")
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{base_url}/forms/contacts_import")
        page.get_by_label("Your e-mail").fill("me@example.com")
        page.get_by_label("Contacts (CSV)").set_input_files(str(wrong))
        page.get_by_role("button", name="Submit").click()
        assert page.get_by_text("This type of file is not accepted here").is_visible()

        page.get_by_label("Contacts (CSV)").set_input_files(str(people))
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url("**/r/*")
        page.wait_for_selector(DONE, timeout=60000)
        assert page.locator("#summary").get_by_text(
            "2 contacts from people.csv are imported.").is_visible()
        with page.expect_download() as download:
            page.get_by_role("link", name="Download contacts-clean.csv").click()
        assert Path(download.value.path()).read_text().splitlines() == [
            "name,email", "Ann,ann@example.com", "Bob,bob@example.com"]
        with page.expect_download() as download:
            page.get_by_role("link", name="people.csv").click()
        assert Path(download.value.path()).read_bytes() == people.read_bytes()
    finally:
        context.close()
