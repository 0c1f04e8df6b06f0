"""Uploads: the `file` field type from the rule file to the worker and the download."""

from __future__ import annotations

import email
import io
import re
import shutil
from pathlib import Path

import pytest
from openapi_spec_validator import validate as validate_openapi
from sqlalchemy import select

from formrules.language.fieldtypes import REGISTRY, format_size, parse_size
from formrules.language.loader import parse_form
from formrules.store import tokens
from formrules.store.models import Record, ResultFile, Run
from tests.helpers import record_of, submit, token_of, wait_until
from tests.helpers import tokens as form_tokens
from tests.web_helpers import login, make_user

UPLOAD = """
form: upload
fields:
  - {name: sheet, type: file, required: true, max_size: 2KB, accept: [text/csv, .csv]}
  - {name: scan, type: file, accept: [application/pdf, image/*]}
"""


def test_a_file_field_parses_its_size_and_accept_options():
    form, problems = parse_form(UPLOAD, "upload.yaml")
    assert problems == []
    sheet, scan = form.fields
    assert (sheet.max_size, sheet.accept) == (2048, ("text/csv", ".csv"))
    assert scan.max_size == 10 * 1024 * 1024  # the documented default
    assert parse_size("5MB") == 5 * 1024 ** 2 and parse_size(300) == 300
    assert format_size(5 * 1024 ** 2) == "5 MB" and format_size(1536) == "1.5 KB"


def test_the_checker_reports_bad_file_options_with_positions():
    text = """form: upload
fields:
  - {name: sheet, type: file, max_size: lots, accept: [csv, text/csv]}
  - {name: name, type: string, accept: [.csv]}
  - {name: doc, type: file, default: x.pdf, max_length: 3}
"""
    _, problems = parse_form(text, "upload.yaml")
    assert [str(p) for p in problems] == [
        "upload.yaml:3:41: fields/0: expected a size like 5MB, 500KB or a number of bytes, "
        "got 'lots'",
        "upload.yaml:3:56: fields/0: 'accept' entry 'csv' is neither a content type "
        "(text/csv, image/*) nor an extension (.csv) (did you mean '.csv'?)",
        "upload.yaml:4:32: fields/1: 'accept' goes with type: file (not string)",
        "upload.yaml:5:45: fields/2: 'max_length' goes with type: string, text or email "
        "(not file)",
        "upload.yaml:5:38: fields/2: a file field has no 'default': files come with the form",
    ]


def test_actions_name_file_fields_and_the_checker_says_when_they_do_not():
    text = """form: upload
fields:
  - {name: sheet, type: file}
  - {name: email, type: email}
  - {name: count, type: integer}
  - {name: secret, type: file, hidden: true}
events:
  submit:
    - background:
        do:
          - import_csv: {file: email, count_into: cuont}
          - send_email: {to: a@example.com, subject: s, body: b, attach: [sheet, shet]}
          - send_email: {to: a@example.com, subject: s, body: b, attach: sheet}
"""
    _, problems = parse_form(text, "upload.yaml")
    assert [str(p) for p in problems] == [
        "upload.yaml:6:40: fields/3: a file field cannot be hidden: files come with the "
        "form, rules cannot set them",
        "upload.yaml:11:32: events/submit/0/background/do/0: 'import_csv' option 'file': "
        "'email' is not a file field (it is email)",
        "upload.yaml:11:51: events/submit/0/background/do/0: unknown field 'cuont' "
        "(did you mean 'count'?)",
        "upload.yaml:12:82: events/submit/0/background/do/1: unknown field 'shet' "
        "(did you mean 'sheet'?)",
    ]


def test_accept_checks_the_extension_and_sniffs_the_content():
    form, _ = parse_form(UPLOAD, "upload.yaml")
    sheet, scan = form.fields
    kind = REGISTRY["file"]
    assert kind.upload_problem(sheet, "people.csv", 40, b"name,email\n") is None
    assert kind.upload_problem(sheet, "people.CSV", 40, b"name,email\n") is None
    assert "not accepted" in kind.upload_problem(sheet, "people.exe", 40, b"MZ\x90")
    # A binary renamed to .csv is not text: the sniff refuses it.
    assert "not accepted" in kind.upload_problem(sheet, "x.csv", 40, b"\x00\x01\x02")
    assert kind.upload_problem(sheet, "big.csv", 4096, b"a") == "The file is larger than 2 KB."
    assert kind.upload_problem(scan, "scan.pdf", 9, b"%PDF-1.7\n") is None
    assert "not accepted" in kind.upload_problem(scan, "scan.pdf", 9, b"<html>")
    assert kind.upload_problem(scan, "photo.png", 9, b"\x89PNG\r\n\x1a\n") is None


# -- end to end: the example rule, a browser's multipart post, a real worker ------------

ROOT = Path(__file__).resolve().parents[1]
PEOPLE = (b"name,email,city\r\nAnn,ann@example.com,Oslo\r\nBob,bob@example.com,Rome\r\n"
          b"Ann again,ANN@example.com,Lima\r\nNobody,,Kyiv\r\n")
SMALL = """
form: small
fields:
  - {name: sheet, type: file, required: true, max_size: 1KB, accept: [.csv]}
"""


@pytest.fixture
def upload_rules(rules_dir):
    """The example contacts import and a form with a 1 KB file, before the app loads."""
    shutil.copy(ROOT / "rules" / "contacts_import.yaml", rules_dir)
    (rules_dir / "small.yaml").write_text(SMALL)


def _files_on_disk(rt) -> list[Path]:
    return sorted(p for p in rt.settings.uploads_dir.rglob("*") if p.is_file())


def test_a_csv_upload_is_imported_in_the_background_and_only_its_owner_downloads_it(
        upload_rules, client, app, rt, worker, operator):
    page = client.get("/forms/contacts_import")
    assert b'enctype="multipart/form-data"' in page.data
    assert b'accept="text/csv,.csv"' in page.data
    response = submit(client, "contacts_import", {
        "email": "me@example.com", "contacts": (io.BytesIO(PEOPLE), "../../etc/people.csv")})
    token = token_of(response)

    status = wait_until(lambda: (s := client.get(f"/r/{token}/status").json)["done"] and s,
                        timeout=60)
    meta = status["record"]["contacts"]
    assert {k: meta[k] for k in ("name", "size", "type")} == {
        "name": "people.csv", "size": len(PEOPLE), "type": "text/csv"}  # no path kept
    assert re.fullmatch(r"[0-9a-f]{32}", meta["key"])
    assert _files_on_disk(rt) == [rt.settings.uploads_dir / meta["key"][:2] / meta["key"]]
    assert status["record"]["imported"] == 2
    run = status["runs"][0]
    assert run["status"] == "done" and run["progress"] == 100
    assert run["title"] == "Importing people.csv"  # templates see the metadata
    with rt.store.session() as s:
        stored = s.scalar(select(Run).where(Run.id == run["id"]))
        assert stored.progress_message == "Importing row 4 of 4"
        files = {f.filename: f.data.decode() for f in
                 s.scalars(select(ResultFile).where(ResultFile.run_id == run["id"]))}
    assert files["contacts-clean.csv"].splitlines() == [
        "name,email,city", "Ann,ann@example.com,Oslo", "Bob,bob@example.com,Rome"]
    assert files["rejected.csv"].splitlines() == [
        "line,reason,name,email,city",
        "4,'email' repeats an earlier row,Ann again,ANN@example.com,Lima",
        "5,'email' is empty,Nobody,,Kyiv"]
    assert b"2 contacts from people.csv are imported." in client.get(f"/r/{token}").data

    # The e-mail carries the upload as an attachment, under its sanitised name.
    sent = [email.message_from_bytes(p.read_bytes())
            for p in Path(rt.settings.outbox_dir).glob("*.eml")]
    assert len(sent) == 1 and sent[0]["Subject"] == "2 contacts imported"
    attached = [part for part in sent[0].walk() if part.get_filename()]
    assert [(a.get_filename(), a.get_payload(decode=True)) for a in attached] == [
        ("people.csv", PEOPLE)]

    # Downloads: the owner and operators; anyone else (another browser) gets 404.
    assert f'href="/r/{token}/files/contacts" download>people.csv<'.encode() in \
        client.get(f"/r/{token}").data
    own = client.get(f"/r/{token}/files/contacts")
    assert own.status_code == 200 and own.data == PEOPLE
    assert own.headers["Content-Disposition"].startswith("attachment")
    assert own.headers["X-Content-Type-Options"] == "nosniff"
    assert app.test_client().get(f"/r/{token}/files/contacts").status_code == 404
    make_user(rt, "bob")
    bob = app.test_client()
    assert login(bob, "bob").status_code == 303
    assert bob.get(f"/r/{token}/files/contacts").status_code == 404
    assert b"/files/contacts" not in bob.get(f"/r/{token}").data  # nor a link to it

    # An operator's edit keeps the upload (files come with the submit only).
    record = record_of(rt, token)
    edit = operator.get(f"/admin/records/{record.id}/edit")
    assert edit.status_code == 200 and b'type="file"' not in edit.data
    saved = operator.post(f"/admin/records/{record.id}/edit", data={
        **form_tokens(edit.data), "version": str(record.version),
        "email": "new@example.com", "imported": "2"})
    assert saved.status_code == 303, saved.data[:2000]
    assert record_of(rt, token).data["contacts"] == meta
    assert client.get(f"/r/{token}/files/email").status_code == 404  # not a file field
    assert operator.get(f"/r/{token}/files/contacts").data == PEOPLE

    # Deleting the record removes its file from disk.
    record = record_of(rt, token)
    page = operator.get(f"/admin/records/{record.id}")
    assert b"people.csv" in page.data
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
    deleted = operator.post(f"/admin/records/{record.id}/delete", data={"csrf_token": csrf})
    assert deleted.status_code == 303
    assert record_of(rt, token) is None and _files_on_disk(rt) == []
    assert operator.get(f"/r/{token}/files/contacts").status_code == 404


def _post_small(client, body: bytes, name: str):
    page = client.get("/forms/small")
    return client.post("/forms/small", data={**form_tokens(page.data),
                                              "sheet": (io.BytesIO(body), name)})


def test_wrong_and_too_large_files_get_field_messages_and_nothing_is_stored(
        upload_rules, client, rt):
    wrong = _post_small(client, b"MZ\x90\x00binary", "tool.exe")
    assert wrong.status_code == 422
    assert b"This type of file is not accepted here (allowed: .csv)." in wrong.data
    renamed = _post_small(client, b"\x00\x01\x02\x03", "data.csv")  # sniffed: not text
    assert renamed.status_code == 422 and b"not accepted" in renamed.data
    large = _post_small(client, b"a,b\n" * 600, "big.csv")  # 2.4 KB: over its 1 KB
    assert large.status_code == 422 and b"The file is larger than 1 KB." in large.data
    missing = client.post("/forms/small", data=form_tokens(client.get("/forms/small").data))
    assert missing.status_code == 422 and b"This field is required." in missing.data
    # Over the whole request's limit: refused unread (413), shown as the field's message.
    huge = _post_small(client, b"x" * (3 * 1024 * 1024), "huge.csv")
    assert huge.status_code == 413
    assert b"The file is too large: at most 1 KB." in huge.data
    assert b'enctype="multipart/form-data"' in huge.data  # the form again, not an error page
    with rt.store.session() as s:
        assert s.scalar(select(Record)) is None
    assert _files_on_disk(rt) == []
    ok = _post_small(client, b"a,b\n1,2\n", "fine.csv")
    assert ok.status_code == 303 and len(_files_on_disk(rt)) == 1
    # The same submit again (a double click): the same record, and no second copy kept.
    fields = form_tokens(client.get("/forms/small").data)
    first, again = (client.post("/forms/small", data={
        **fields, "sheet": (io.BytesIO(b"a,b\n3,4\n"), "twice.csv")}) for _ in range(2))
    assert first.headers["Location"] == again.headers["Location"]
    assert len(_files_on_disk(rt)) == 2


def test_the_api_takes_files_as_multipart_and_serves_them_to_their_client_only(
        upload_rules, app, rt):
    with rt.store.session() as s:
        mine = {"Authorization": f"Bearer {tokens.create(s, 'robot')}"}
        other = {"Authorization": f"Bearer {tokens.create(s, 'other')}"}
        s.commit()
    api = app.test_client()
    as_json = api.post("/api/forms/small", json={"sheet": "a,b"}, headers=mine)
    assert as_json.status_code == 422
    assert as_json.json["fields"]["sheet"] == [
        "Send files as multipart/form-data (see the API documentation)."]
    created = api.post("/api/forms/small", headers=mine,
                       data={"sheet": (io.BytesIO(b"a,b\n1,2\n"), "numbers.csv")})
    assert created.status_code == 201, created.json
    assert created.json["record"]["sheet"]["name"] == "numbers.csv"
    token = created.json["token"]
    assert api.get(f"/api/records/{token}/files/sheet", headers=mine).data == b"a,b\n1,2\n"
    assert api.get(f"/api/records/{token}/files/sheet", headers=other).status_code == 404
    patched = api.patch(f"/api/records/{token}", headers=mine, json={"sheet": "other.csv"})
    assert patched.status_code == 422
    assert record_of(rt, token).data["sheet"] == created.json["record"]["sheet"]
    wrong = api.post("/api/forms/small", headers=mine,
                     data={"sheet": (io.BytesIO(b"MZ"), "x.exe"), "nope": "1"})
    assert wrong.status_code == 422 and set(wrong.json["fields"]) == {"sheet", "nope"}
    huge = api.post("/api/forms/small", headers=mine,
                    data={"sheet": (io.BytesIO(b"x" * (3 * 1024 * 1024)), "huge.csv")})
    assert huge.status_code == 413
    assert huge.json["fields"] == {"sheet": ["The file is too large: at most 1 KB."]}

    document = api.get("/api/openapi.json").json
    validate_openapi(document)  # still valid OpenAPI 3.1 with the multipart body
    body = document["paths"]["/api/forms/small"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"] == {"$ref": "#/components/schemas/small.multipart"}
    assert document["components"]["schemas"]["small.multipart"]["properties"]["sheet"][
        "contentMediaType"] == "application/octet-stream"
    assert "sheet" not in document["components"]["schemas"]["small.input"]["properties"]
    assert "413" in document["paths"]["/api/forms/small"]["post"]["responses"]


@pytest.mark.integration  # runs the CLI in a subprocess
def test_preview_stands_in_a_file_by_its_name(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORMRULES_INSTANCE": str(tmp_path / "i")}
    result = subprocess.run(
        [sys.executable, "-m", "formrules.cli", "preview", "contacts_import", "--rules",
         str(ROOT / "rules"), "--set", "email=ann@example.com", "--set", "contacts=people.csv"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(
        "events/submit/0/background: background 'Importing people.csv' runs at once")
    assert "'body': 'Your file people.csv (0 bytes) is imported;" in result.stdout
    assert not (tmp_path / "i" / "uploads").exists()  # nothing read, nothing stored
