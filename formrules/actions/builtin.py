"""The built-in actions: set, log, send_email, http_request, simulate_work, import_csv, report."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from formrules.actions import http_limits, mail
from formrules.actions.context import Context
from formrules.actions.registry import Param, action
from formrules.errors import PermanentError, RetryableError
from formrules.language import sandbox
from formrules.language.duration import parse_duration

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>[^{}]*)\}\}\s*$")


def _check_set(checker, args, pos, path) -> list[str]:
    """`set` takes {field: value}; every field must be declared."""
    if not isinstance(args, dict) or not args:
        return ["'set' takes a mapping of field names to values, like {status: done}"]
    for name, value in args.items():
        checker.field_name(name, checker.key_pos(args, name), path)
        if isinstance(value, str):
            checker.template(value, checker.value_pos(args, name), path, expression=False)
    return []


@action("set", render_args=False, extra_check=_check_set, fields_only=True)
def set_fields(ctx: Context, args: dict[str, Any]) -> None:
    """Set fields of the record; values are templates (`{{ expr }}` keeps its type)."""
    variables = ctx.variables()
    for name, value in args.items():
        if isinstance(value, str):
            match = _SINGLE_EXPRESSION.match(value)
            value = (sandbox.evaluate(match["expr"], variables) if match
                     else sandbox.render(value, variables))
        ctx.set(name, value)


@action("log", {"message": "text!", "level": "text"}, positional="message")
def log(ctx: Context, message: str, level: str = "info") -> None:
    """Write a line to the run's log (and trace)."""
    ctx.log.log({"debug": 10, "info": 20, "warning": 30, "error": 40}.get(level, 20),
                "%s: %s", ctx.path, message)


@action("send_email", {"to": "text!", "subject": "text!", "body": "text!", "cc": "text",
                       "reply_to": "text", "html": Param("text", html=True),
                       "attach": "file"})
def send_email(ctx: Context, to: str, subject: str, body: str, cc: str = "",
               reply_to: str = "", html: str = "", attach: str | list | None = None) -> None:
    """Send an e-mail (SMTP, or an .eml file in the outbox when SMTP is not set up)."""
    if not to.strip():
        raise PermanentError("send_email: empty recipient", "No e-mail address was given.")
    # A YAML block (`subject: >`) ends in a newline: that one is layout, not content.
    headers = {"To": to.strip(), "Cc": cc.strip(), "Reply-To": reply_to.strip(),
               "Subject": subject.strip()}
    for name, value in headers.items():
        # A line break in a header is never passing: the same values fail every attempt
        # (and a header injection attempt must not be retried for days either).
        if "\r" in value or "\n" in value:
            raise PermanentError(f"send_email: the {name} header contains a line break: "
                                 f"{value[:200]!r}",
                                 f"The e-mail's {name.lower()} contains a line break, which "
                                 "an e-mail header cannot hold.")
    message = EmailMessage()
    try:
        message["From"] = ctx.settings.mail_from
        for name, value in headers.items():
            if value:
                message[name] = value
    except (ValueError, TypeError) as exc:  # the email package's verdict on a bad value
        raise PermanentError(f"send_email: {exc}",
                             "The e-mail could not be written with these values.") from exc
    message["Date"] = formatdate(localtime=False)
    # A stable Message-ID per step lets receivers (and our outbox) drop a repeated send.
    digest = hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:32]
    message["Message-ID"] = f"<{digest}@formrules>"
    message.set_content(body)
    if html:
        message.add_alternative(html, subtype="html")
    for name in [attach] if isinstance(attach, str) else attach or []:
        meta = ctx.upload(name)
        if meta is None:
            continue  # an optional upload left empty: nothing to attach
        maintype, _, subtype = (meta.get("type") or "application/octet-stream").partition("/")
        message.add_attachment(ctx.read_upload(name), maintype=maintype,
                               subtype=subtype or "octet-stream", filename=meta["name"])
    try:
        where = mail.send(ctx.settings, message)
    except OSError as exc:  # smtplib errors are OSErrors too
        raise RetryableError(f"send_email: {exc}", "The e-mail could not be sent yet.") from exc
    ctx.log.info("%s: e-mail to %s via %s", ctx.path, to, where)


# What the person waiting reads when a called service fails: what happened, in their
# terms. Host names, URLs and status codes are internal: they go to the trace and the log.
SERVICE_SAYS = {
    "unreachable": "A service needed for this could not be reached.",
    "late": "A service needed for this did not answer in time.",
    "busy": "A service needed for this is busy at the moment.",
    "failed": "A service needed for this had a problem on its side.",
    "refused": "A service needed for this did not accept the request.",
}


@action("http_request", {"url": "text!", "method": "text", "headers": "mapping",
                         "json": "any", "body": "text", "timeout": "duration",
                         "save": Param("mapping", render=False)})
def http_request(ctx: Context, url: str, method: str = "POST", headers: dict | None = None,
                 json: Any = None, body: str | None = None, timeout: Any = "30s",
                 save: dict | None = None) -> None:
    """Call an allowed HTTP endpoint, sending the step's Idempotency-Key header."""
    if not allowed(url, ctx.settings.http_allow):
        raise PermanentError(f"http_request: {_origin(url)!r} is not in FORMRULES_HTTP_ALLOW",
                             "This form is not allowed to contact that service.")
    waited = http_limits.wait_turn(ctx.settings, url, ctx.check_cancelled)
    if waited >= 0.01:
        ctx.log.info("%s: waited %.2fs for %s's rate limit", ctx.path, waited, _origin(url))
    data = None
    sent_headers = {"Idempotency-Key": ctx.idempotency_key, **(headers or {})}
    if json is not None:
        data = _json_dumps(json).encode()
        sent_headers.setdefault("Content-Type", "application/json")
    elif body is not None:
        data = body.encode()
    request = urllib.request.Request(url, data=data, method=method.upper(),
                                     headers=sent_headers)
    opener = urllib.request.build_opener(_AllowlistRedirects(ctx.settings.http_allow))
    seconds = parse_duration(timeout).total_seconds()
    try:
        with opener.open(request, timeout=seconds) as response:
            payload = response.read(10_000_000)
            status = response.status
    except urllib.error.HTTPError as exc:
        detail = f"http_request {url}: HTTP {exc.code}"
        if exc.code in (408, 425, 429, 503):
            raise RetryableError(detail, SERVICE_SAYS["busy"]) from exc
        if exc.code >= 500:
            raise RetryableError(detail, SERVICE_SAYS["failed"]) from exc
        raise PermanentError(detail, SERVICE_SAYS["refused"]) from exc
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        late = isinstance(exc, TimeoutError) or isinstance(
            getattr(exc, "reason", None), TimeoutError)
        raise RetryableError(f"http_request {url}: {exc}",
                             SERVICE_SAYS["late" if late else "unreachable"]) from exc
    ctx.log.info("%s: %s %s -> %s", ctx.path, method.upper(), url, status)
    if save:
        text = payload.decode("utf-8", errors="replace")
        try:
            parsed = _json_loads(text)
        except ValueError:
            parsed = None
        variables = {**ctx.variables(), "response": {"status": status, "text": text,
                                                     "json": parsed}}
        for name, template in save.items():
            ctx.set(name, sandbox.render(str(template), variables))


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> str:
    """`host:port` of a URL, the port made explicit (what allowlist entries name)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number, or out of range
        port = None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed(url: str, allow: tuple[str, ...]) -> bool:
    """May `http_request` call `url`? An allowlist entry `host` allows that host on the
    scheme's default port only (80, 443); `host:port` allows that port; `host:*` any."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False
    try:
        port = parts.port
    except ValueError:
        return False
    host = parts.hostname.lower()
    named = f"[{host}]" if ":" in host else host
    default = port is None or port == DEFAULT_PORTS[parts.scheme]
    return (default and host in allow) or _origin(url) in allow or f"{named}:*" in allow


class _AllowlistRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to an allowed host: the allowlist must not be a detour."""

    def __init__(self, allowed: tuple[str, ...]):
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not allowed(newurl, self.allowed):
            raise PermanentError(f"http_request: redirect to {newurl!r} is not allowed",
                                 "This form is not allowed to contact that service.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _json_dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def _json_loads(text: str) -> Any:
    return json.loads(text)


@action("simulate_work", {"seconds": "number", "steps": "int", "message": "text",
                          "fail_attempts": "int"})
def simulate_work(ctx: Context, seconds: float = 5, steps: int = 10, message: str = "",
                  fail_attempts: int = 0) -> None:
    """Sleep `seconds` in `steps`, reporting progress; fail the first `fail_attempts` tries."""
    steps = max(1, int(steps))
    if ctx.attempt <= int(fail_attempts):
        raise RetryableError(f"simulate_work: planned failure on attempt {ctx.attempt}",
                             "A simulated hiccup; trying again shortly.")
    for i in range(steps):
        ctx.check_cancelled()
        time.sleep(float(seconds) / steps)
        ctx.progress(i + 1, steps, message or f"Step {i + 1} of {steps}")


@action("import_csv", {"file": "file!", "required": "list", "unique": "text",
                       "filename": "text", "count_into": "field", "message": "text"})
def import_csv(ctx: Context, file: str, required: list | None = None, unique: str = "",
               filename: str = "imported.csv", count_into: str = "",
               message: str = "Importing row {row} of {total}") -> None:
    """Read an uploaded CSV row by row with progress: keep the rows that fill every
    `required` column (and repeat no `unique` value) as a result file, list the others
    with their reason in `rejected.csv`, and count the kept rows into `count_into`."""
    required = [str(c) for c in required or []]
    kept: list[dict[str, str]] = []
    rejected: list[list[str]] = []
    seen: set[str] = set()
    columns: list[str] | None = None
    for number, row in enumerate(ctx.csv_rows(file, message), 2):  # line 1 is the header
        if columns is None:
            columns = list(row)
            missing = [c for c in [*required, *([unique] if unique else [])]
                       if c not in columns]
            if missing:
                raise PermanentError(f"import_csv: {file} lacks columns {missing}",
                                     f"The file has no column '{missing[0]}'.")
        empty = [c for c in required if not row.get(c)]
        if empty:
            rejected.append([str(number), f"'{empty[0]}' is empty", *row.values()])
        elif unique and row[unique].lower() in seen:
            rejected.append([str(number), f"'{unique}' repeats an earlier row",
                             *row.values()])
        else:
            seen.add(row.get(unique, "").lower())
            kept.append(row)
    report(ctx, filename, columns=columns or required, rows=kept)
    if rejected:
        report(ctx, "rejected.csv", columns=["line", "reason", *(columns or [])],
               rows=rejected)
    if count_into:
        ctx.set(count_into, len(kept))
    ctx.log.info("%s: %s: %d rows imported, %d rejected", ctx.path, file, len(kept),
                 len(rejected))


@action("report", {"filename": "text!", "columns": "list", "rows": "list",
                   "content": "text", "records": "text", "content_type": "text"})
def report(ctx: Context, filename: str, columns: list | None = None, rows: list | None = None,
           content: str | None = None, records: str | None = None,
           content_type: str | None = None) -> None:
    """Attach a result file: `content` as is, or CSV of `rows`, this record, or `records`."""
    if content is not None:
        ctx.attach(filename, content, content_type or "text/plain; charset=utf-8")
        return
    if rows is None:
        if records == "all":
            if ctx.all_records is None:
                raise PermanentError("report: records: all needs a worker (use it inside "
                                     "background, delay, a batch or a schedule)")
            rows = ctx.all_records()
        else:
            rows = [ctx.data]
    columns = [str(c) for c in (columns or list(ctx.field_types))]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        if isinstance(row, dict):
            writer.writerow([_cell(row.get(c)) for c in columns])
        else:
            writer.writerow([_cell(v) for v in (row if isinstance(row, list) else [row])])
    ctx.attach(filename, out.getvalue(), content_type or "text/csv; charset=utf-8")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if isinstance(value, int | float) or re.fullmatch(r"-?\d+(\.\d+)?", text):
        return text
    # Spreadsheet formula injection: a text cell starting with = + - @ is kept as text.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
