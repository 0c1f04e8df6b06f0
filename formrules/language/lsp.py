"""`formrules lsp`: a language server for rule files (pygls), over stdio.

What a JSON Schema cannot give an editor:
- diagnostics: the checker's own problems (templates, expressions, field names, cron,
  durations...) as you type, at the line and column `formrules check` reports;
- completion: field names after `record.`, `old.` and `changed.` (and `form.`/`run.`
  names) inside templates and expressions; action names and node kinds where a node
  starts; an action's arguments inside its mapping; a batch's options under
  `batches: <name>:`; a form's top-level keys at the start of a line;
  the file's named trees after `tree:` in a `call:`;
- hover: an action's or option's reference text (docs/rules.md, else the docstring).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from formrules.actions import registry as actions
from formrules.language.checker import DEFER_KEYS, KINDS, PROGRESS_KEYS, RETRY_KEYS
from formrules.language.loader import BATCH_KEYS, FORM_KEYS, OLD_BATCHES_KEY, parse_form
from formrules.language.variables import FORM_NAMES, RUN_NAMES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
ATTRIBUTE = re.compile(r"\b(record|old|changed|form|run)\.(\w*)$")
NODE_START = re.compile(r"^\s*-\s+(\w*)$")
FLOW_ACTION = re.compile(r"-\s+(\w+):\s*\{[^}]*$")
BLOCK_OWNER = re.compile(r"^(\s*)-?\s*(\w+):\s*$")
WORD = re.compile(r"\w+")
TOP_LEVEL = re.compile(r"^\w*$")
BATCH = "batches/<name>"  # `_owner` of the lines under `batches: <name>:`
TREE_NAME = re.compile(r"\btree:\s*['\"]?(\w*)$")  # `call: {tree: <here>` or a block `tree:`

server = LanguageServer("formrules", "1", text_document_sync_kind=types.TextDocumentSyncKind.Full)
_fields: dict[str, list[str]] = {}  # per document: the last field names that parsed
_trees: dict[str, list[str]] = {}  # per document: the last named trees that parsed


def diagnostics(text: str, file: str) -> list[types.Diagnostic]:
    """The checker's problems for one document, as LSP diagnostics."""
    form, problems = parse_form(text, file)
    if form is not None:
        _fields[file] = [f.name for f in form.fields]
        _trees[file] = list(form.trees)
    lines = text.splitlines()
    out = []
    for p in problems:
        line, col = max(p.line - 1, 0), max(p.col - 1, 0)
        source = lines[line] if line < len(lines) else ""
        word = WORD.match(source, col) if col < len(source) else None
        end = word.end() if word else min(col + 1, max(len(source), col + 1))
        where = f"{p.path}: " if p.path else ""
        out.append(types.Diagnostic(
            range=types.Range(types.Position(line, col), types.Position(line, end)),
            message=f"{where}{p.message}",
            severity=types.DiagnosticSeverity.Error if p.is_error
            else types.DiagnosticSeverity.Warning,
            source="formrules"))
    return out


def completions(text: str, line: int, character: int, file: str) -> list[types.CompletionItem]:
    """What may be typed at a position: fields, names, actions or arguments."""
    lines = text.splitlines()
    current = lines[line] if line < len(lines) else ""
    before = current[:character]
    attribute = ATTRIBUTE.search(before)
    if attribute:
        variable = attribute.group(1)
        names = {"form": FORM_NAMES, "run": RUN_NAMES}.get(variable) or \
            _field_names("\n".join(lines[:line] + [""] + lines[line + 1:]), file)
        kind = types.CompletionItemKind.Field
        return [types.CompletionItem(label=n, kind=kind, detail=f"{variable}.{n}")
                for n in names]
    if TREE_NAME.search(before):
        _field_names("\n".join(lines[:line] + [""] + lines[line + 1:]), file)
        return [types.CompletionItem(label=n, kind=types.CompletionItemKind.Function,
                                     detail="named tree (trees:)") for n in
                _trees.get(file) or re.findall(r"^  ([a-z]\w*):", _trees_block(text), re.M)]
    if NODE_START.match(before):
        items = [types.CompletionItem(label=k, kind=types.CompletionItemKind.Keyword,
                                      detail="node kind") for k in KINDS]
        for name, spec in sorted(actions.registry().items()):
            items.append(types.CompletionItem(label=name, kind=types.CompletionItemKind.Function,
                                              detail=_signature(spec),
                                              documentation=_doc_of(spec)))
        return items
    if TOP_LEVEL.match(before):
        return [types.CompletionItem(label=key, kind=types.CompletionItemKind.Property,
                                     detail="form key") for key in FORM_KEYS]
    owner = _owner(lines, line, before)
    if owner is None:
        return []
    return [types.CompletionItem(label=key, kind=types.CompletionItemKind.Property,
                                 detail=f"{owner} option") for key in _options(owner)]


def hover(text: str, line: int, character: int) -> types.Hover | None:
    """The reference text of the action, node kind or option under the cursor."""
    lines = text.splitlines()
    if line >= len(lines):
        return None
    word = next((m.group() for m in WORD.finditer(lines[line])
                 if m.start() <= character <= m.end()), None)
    if word is None:
        return None
    spec = actions.get(word)
    body = _reference().get(word) or (_doc_of(spec) if spec else None)
    if not body:
        return None
    title = f"**{word}**" + (f" `{_signature(spec)}`" if spec else "")
    return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown,
                                                    value=f"{title}\n\n{body}"))


def _field_names(text: str, file: str) -> list[str]:
    """The form's fields, from the text without the line being typed (half a template
    does not parse), else the last that parsed, else every `name:` written."""
    form, _ = parse_form(text, file)
    if form is not None:
        _fields[file] = [f.name for f in form.fields]
        _trees[file] = list(form.trees)
    return _fields.get(file) or re.findall(r"\bname:\s*([a-z]\w*)", text)


def _trees_block(text: str) -> str:
    """The lines of a top-level `trees:` mapping (for names when the file does not parse)."""
    match = re.search(r"^trees:\s*\n((?:[ \t]+.*\n?|\s*\n)*)", text, re.M)
    return match.group(1) if match else ""


def _owner(lines: list[str], line: int, before: str) -> str | None:
    """The action or node kind whose options are being written at this position."""
    flow = FLOW_ACTION.search(before)
    if flow:
        return flow.group(1)
    found = _enclosing(lines, line, len(before) - len(before.lstrip()))
    if found is None:
        return None
    index, name = found
    outer = _enclosing(lines, index, len(lines[index]) - len(lines[index].lstrip(" -")))
    if outer is not None and outer[1] in ("batches", OLD_BATCHES_KEY):
        return BATCH
    return name


def _enclosing(lines: list[str], line: int, indent: int) -> tuple[int, str | None] | None:
    """The nearest line above `line` indented less than `indent`, and the key it opens."""
    for index in range(line - 1, -1, -1):
        above = lines[index]
        if not above.strip():
            continue
        if len(above) - len(above.lstrip(" -")) < indent:
            match = BLOCK_OWNER.match(above)
            return index, match.group(2) if match else None
    return None


def _options(owner: str) -> list[str]:
    if owner == BATCH:
        return list(BATCH_KEYS)
    if owner in DEFER_KEYS:
        return list(DEFER_KEYS[owner])
    if owner == "progress":
        return list(PROGRESS_KEYS)
    if owner == "retry":
        return list(RETRY_KEYS)
    spec = actions.get(owner)
    return list(spec.params or ()) if spec else []


def _signature(spec: actions.ActionSpec) -> str:
    if spec.params is None:
        return "{...}"
    return "{" + ", ".join(k + ("!" if p.required else "") for k, p in spec.params.items()) + "}"


def _doc_of(spec: actions.ActionSpec | None) -> str:
    return " ".join((spec.fn.__doc__ or "").split()) if spec else ""


@cache
def _reference() -> dict[str, str]:
    """`### \\`name\\`` headings of docs/rules.md -> the paragraph under them."""
    if not DOCS.is_file():
        return {}
    out: dict[str, str] = {}
    for match in re.finditer(r"^###\s+`([\w ]+?)`.*?\n\n(.+?)\n\n", DOCS.read_text(
            encoding="utf-8"), re.M | re.S):
        for name in re.findall(r"\w+", match.group(1)):
            out.setdefault(name, " ".join(match.group(2).split()))
    return out


def _check(ls: LanguageServer, uri: str) -> None:
    document = ls.workspace.get_text_document(uri)
    ls.text_document_publish_diagnostics(types.PublishDiagnosticsParams(
        uri=uri, diagnostics=diagnostics(document.source, document.path),
        version=document.version))


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: LanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    """Check a document when it is opened."""
    _check(ls, params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: LanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    """Check it again on every change: the checker is fast enough to run as you type."""
    _check(ls, params.text_document.uri)


@server.feature(types.TEXT_DOCUMENT_COMPLETION,
                types.CompletionOptions(trigger_characters=[".", " ", "{"]))
def completion(ls: LanguageServer, params: types.CompletionParams) -> types.CompletionList:
    """Fields in templates, actions where a node starts, an action's arguments."""
    document = ls.workspace.get_text_document(params.text_document.uri)
    items = completions(document.source, params.position.line, params.position.character,
                        document.path)
    return types.CompletionList(is_incomplete=False, items=items)


@server.feature(types.TEXT_DOCUMENT_HOVER)
def on_hover(ls: LanguageServer, params: types.HoverParams) -> types.Hover | None:
    """The reference text of what is under the cursor."""
    document = ls.workspace.get_text_document(params.text_document.uri)
    return hover(document.source, params.position.line, params.position.character)


def serve(modules: str | None) -> None:
    """Load the custom actions (FORMRULES_ACTIONS) and serve LSP on stdin/stdout."""
    actions.load_modules(modules)
    server.start_io()
