"""The operator's form pages (issue 12, items 3 and 5): a form's trees with the Runs on
each deferred node now (one grouped query), the Runs list filtered by node and state,
and the impact of an edit the app has just reloaded."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from formrules.store.models import Run
from tests.helpers import submit, token_of, wait_until
from tests.test_impact import NEW, OLD
from tests.web_helpers import add_web_rules


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


def counts_row(page: str, path: str) -> list[str]:
    """The counts (queued … dead) of one node in the page's table."""
    return re.findall(rf'data-path="{re.escape(path)}" data-state="\w+"[^>]*>(\d+)<', page)


def test_the_form_pages_are_for_operators_only(app, client, rt):
    from tests.web_helpers import login, make_user

    for path in ("/admin/forms", "/admin/forms/later"):
        response = client.get(path)
        assert response.status_code == 302 and "/login?next=/admin/forms" in \
            response.headers["Location"]
    make_user(rt, "ursula")
    login(client, "ursula")
    assert client.get("/admin/forms/later").status_code == 403


def test_the_form_page_counts_runs_per_node_and_links_to_them(operator, client, rt):
    for name in ("Ann", "Bob"):
        token_of(submit(client, "later", {"name": name}))  # a Delay an hour out: waiting
    response = operator.get("/admin/forms/later")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert counts_row(page, "events/submit/0/delay") == ["0", "0", "0", "2", "0"]
    assert "waiting 2" in page  # in the diagram's source too
    assert "form later: Remind me later" in page  # the outline under the diagram
    nonce = re.search(r'data-style-nonce="([^"]+)"', page).group(1)
    csp = response.headers["Content-Security-Policy"]
    assert f"style-src 'self' 'nonce-{nonce}'" in csp and "script-src 'self';" in csp
    assert "nonce" not in operator.get("/admin").headers["Content-Security-Policy"]
    listed = operator.get("/admin?form=later&path=events/submit/0/delay&state=waiting")
    assert listed.get_data(as_text=True).count("Reminder for ") == 2
    assert "Reminder for" not in operator.get(
        "/admin?form=later&path=events/submit/0/delay&state=dead").get_data(as_text=True)
    assert operator.get("/admin/forms/nope").status_code == 404


def test_the_forms_page_shows_the_impact_of_the_latest_reload(operator, client, rt,
                                                               rules_dir):
    (rules_dir / "shop.yaml").write_text(OLD)
    wait_until(lambda: "shop" in operator.get("/admin/forms").get_data(as_text=True),
               timeout=10)
    token_of(submit(client, "shop", {"name": "Ann", "note": "boots"}))
    with rt.store.session() as s:
        delay = s.scalar(select(Run.id).where(Run.node_path == "events/submit/1/delay"))
    (rules_dir / "shop.yaml").write_text(NEW)

    def reloaded() -> str | None:
        text = operator.get("/admin/forms").get_data(as_text=True)
        return text if "shop</a>: changed" in text else None

    page = wait_until(reloaded, timeout=10)
    assert "2 pending Runs keep the tree they started with" in page
    assert ("Moved: <span class=\"mono\">events/submit/0/background</span> → "
            "<span class=\"mono\">events/submit/1/background</span>") in page
    assert "Removed but still used by 1 pending Run: field note" in page
    assert "Schedule nightly: cron &#39;0 2 * * *&#39; -&gt; &#39;0 3 * * *&#39;" in page
    assert f'href="/admin/runs/{delay}"' in page
    form_page = operator.get("/admin/forms/shop").get_data(as_text=True)
    assert "Impact of the latest edit" in form_page
    # The Runs at the old path show on the form page under it, outside the tree now.
    assert "events/submit/0/background</a> <span class=\"muted\">(not in the tree now)" \
        in form_page
