"""Operator pages per form: its trees drawn as diagrams, with the Runs on each deferred
node right now, and what the latest edit of its rules changes for pending work.

The diagram is Mermaid (`static/vendor/mermaid.min.js`, served by the app) drawing the
source `formrules.language.diagram` writes. Mermaid puts a <style> element inside each SVG:
this page alone lets a <style> in with a per-response nonce (`style-src 'self'
'nonce-…'`), which `static/diagram.js` gives to the style elements Mermaid creates; style
attributes stay refused (the script turns them into CSSOM writes, which CSP does not
govern). Below each diagram: the `formrules show` outline, for no-JS and screen readers.
"""

from __future__ import annotations

import secrets

from flask import abort, make_response, render_template, url_for

from formrules.language import diagram
from formrules.language.outline import outline
from formrules.runs.impact import impact_now
from formrules.runs.nodes import node_counts
from formrules.web.admin import bp
from formrules.web.auth import operator_required
from formrules.web.headers import CSP
from formrules.web.state import db, rt, rules


@bp.get("/forms")
@operator_required
def forms():
    """Every form in use, each linking to its diagram; the impact of the latest edits."""
    return render_template("admin/forms.html", forms=sorted(rules().forms.values(),
                                                            key=lambda f: f.id),
                           impact=impact_now(db(), rt().settings.rules_dir))


@bp.get("/forms/<form_id>")
@operator_required
def form(form_id: str):
    """A form's trees as diagrams, with Runs per state on each deferred node."""
    found = rules().form(form_id) or abort(404)
    counts = node_counts(db(), form_id)

    def link(path: str, state: str | None = None) -> str:
        return url_for("admin.runs", form=form_id, path=path, state=state)

    nodes = [(path, counts.get(path, {})) for path in diagram.deferred_paths(found)]
    known = {path for path, _ in nodes}
    # Runs at paths the tree no longer has: started before an edit moved or removed them.
    elsewhere = sorted((p, c) for p, c in counts.items() if p not in known)
    nonce = secrets.token_urlsafe(18)
    page = render_template(
        "admin/form.html", form=found, charts=diagram.charts(found, counts, link),
        outline=outline(found), nodes=nodes, elsewhere=elsewhere, states=diagram.STATES,
        link=link, nonce=nonce,
        impact=[i for i in impact_now(db(), rt().settings.rules_dir) if i.form_id == form_id])
    response = make_response(page)
    response.headers["Content-Security-Policy"] = CSP.replace(
        "style-src 'self'", f"style-src 'self' 'nonce-{nonce}'")
    return response
