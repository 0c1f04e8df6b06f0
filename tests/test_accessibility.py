"""Accessibility of every end-user page and form state, in a real browser: axe-core (from
the npm registry) finds no serious or critical violation; each example form can be filled
in and sent with the keyboard alone; the waiting page's progress reaches screen readers.
"""

from __future__ import annotations

import shutil

import pytest

from tests.journey import (
    DONE,
    EXAMPLES,
    answers,
    axe_problems,
    axe_source,
    short_rules,
    shot,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# axe-core is injected as an inline script, which the pages' own CSP rightly refuses.
DESKTOP = {"viewport": {"width": 1280, "height": 900}, "bypass_csp": True}


@pytest.fixture
def database_url(tmp_path, sqlite_template):
    """SQLite only: what is checked here is the markup, the same on every database."""
    shutil.copyfile(sqlite_template, tmp_path / "formrules.db")
    return f"sqlite:///{tmp_path}/formrules.db"


@pytest.fixture
def rules_dir(tmp_path):
    """The shipped examples, with waits of days cut to a minute."""
    return short_rules(tmp_path / "rules")


@pytest.fixture(scope="module")
def axe():
    """axe-core's source, installed from the npm registry on first use."""
    return axe_source()


def focused(page) -> str:
    """The name (or id, or text) of the element that has the keyboard focus."""
    return page.evaluate("""() => { const e = document.activeElement;
        return e ? (e.name || e.id || e.textContent.trim()) : ''; }""")


def type_into_focused(page, value: str) -> None:
    """Enter a value with the keyboard, the way the focused control takes it."""
    kind = page.evaluate("() => document.activeElement.type")
    if kind == "date":  # Chromium's date input takes the digits in its locale's order
        year, month, day = value.split("-")
        page.keyboard.type(f"{month}{day}{year}")
    elif kind == "select-one":  # type-ahead picks the option starting with these letters
        page.keyboard.type(value)
    elif kind == "file":  # the file chooser is the system's: Playwright answers it
        page.locator(":focus").set_input_files(value)
    else:
        page.keyboard.press("Control+A")
        page.keyboard.type(value)


@pytest.mark.parametrize("form_id", EXAMPLES)
def test_every_form_state_is_accessible_and_works_by_keyboard(form_id, browser, web,
                                                              worker, axe):
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    found: list[str] = []
    try:
        for path in ("/", "/tasks", "/notifications", "/login"):
            page.goto(web.url + path)
            found += axe_problems(page, axe)

        page.goto(f"{web.url}/forms/{form_id}")
        found += axe_problems(page, axe)  # empty
        page.get_by_role("button", name="Submit").click()
        page.wait_for_selector('[aria-invalid="true"]')
        found += axe_problems(page, axe)  # errors shown
        # The first invalid field is reachable and its message tied to it.
        first = page.locator('[aria-invalid="true"]').first
        assert first.get_attribute("aria-describedby"), "error messages are not tied to fields"

        # Keyboard only, from the top of a fresh form: Tab to each field, type, Enter.
        page.goto(f"{web.url}/forms/{form_id}")
        values = answers(form_id, "Kay Board")
        names = list(values)
        for _ in range(30):
            if focused(page) == names[0]:
                break
            page.keyboard.press("Tab")
        for name in names:
            assert focused(page) == name, f"Tab reached {focused(page)!r}, not {name!r}"
            type_into_focused(page, values[name])
            for _ in range(4):  # a date input may keep the focus for its own parts
                page.keyboard.press("Tab")
                if focused(page) != name:
                    break
        assert focused(page) == "Submit", f"after the last field Tab reached {focused(page)!r}"
        page.keyboard.press("Enter")
        page.wait_for_url("**/r/*")
        if page.locator('.status-body[data-state="working"]').count():
            # Progress reaches screen readers: a named progressbar with a value, and a
            # live region that will say how it ended.
            bars = page.get_by_role("progressbar")
            assert bars.count() >= 1
            assert bars.first.evaluate("e => e.labels.length || e.getAttribute"
                                       "('aria-labelledby') || e.getAttribute('aria-label')")
            # <progress value> is what assistive technology reads as aria-valuenow.
            assert bars.first.evaluate("e => e.getAttribute('aria-valuenow') "
                                       "|| e.getAttribute('value')") is not None
            assert page.locator("[aria-live]").count() >= 1
            found += axe_problems(page, axe)  # waiting
        page.wait_for_selector(DONE, timeout=90000)
        found += axe_problems(page, axe)  # done
        if page.locator("#announce").count() and page.evaluate("window.fetch !== undefined"):
            live = page.locator("#announce").text_content() or ""
            headline = page.locator("#summary .headline").text_content() or ""
            assert live == "" or live.strip() in headline, (live, headline)
        page.goto(f"{web.url}/tasks")
        found += axe_problems(page, axe)  # my tasks with this one in it
        assert not found, "\n".join(found)
    except Exception:
        shot(page, f"a11y-{form_id}")
        raise
    finally:
        context.close()


def test_no_page_asks_for_a_missing_file(browser, web):
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    missing = []  # Chromium fetches the icon itself: only its console tells of a 404
    page.on("console", lambda msg: msg.type == "error" and missing.append(
        f"{msg.text} ({msg.location.get('url')})"))
    try:
        for path in ("/", "/forms/newsletter", "/tasks"):
            page.goto(web.url + path)
            page.wait_for_load_state("networkidle")
        assert missing == []
    finally:
        context.close()


def test_the_operator_form_pages_are_accessible(browser, web, rt, axe):
    """The forms list and each example form's diagram page, drawn, pass axe-core too:
    the diagram is labelled and its counts are a table of links."""
    from tests.web_helpers import PASSWORD, make_user

    make_user(rt, "olga", operator=True)
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    found: list[str] = []
    try:
        page.goto(f"{web.url}/login?next=/admin/forms")
        page.get_by_label("User name").fill("olga")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/admin/forms")
        found += axe_problems(page, axe)
        for form_id in EXAMPLES:
            page.goto(f"{web.url}/admin/forms/{form_id}")
            page.wait_for_selector('#diagrams[data-rendered="true"]', timeout=30000)
            assert page.locator(".diagram svg").count() >= 1
            found += axe_problems(page, axe)
        assert found == []
    except Exception:
        shot(page, "a11y-admin-forms")
        raise
    finally:
        context.close()
