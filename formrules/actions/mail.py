"""Sending e-mail: SMTP when configured, else `.eml` files in the instance outbox."""

from __future__ import annotations

import re
import smtplib
from email.message import EmailMessage
from pathlib import Path

from formrules.config import Settings


def send(settings: Settings, message: EmailMessage) -> str:
    """Deliver `message`; return where it went (the SMTP host or the .eml path)."""
    if not settings.smtp_host:
        return str(write_outbox(settings.outbox_dir, message))
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_tls:
            smtp.starttls()
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(message)
    return settings.smtp_host


def write_outbox(folder: Path, message: EmailMessage) -> Path:
    """Write the message as an .eml file named after its Message-ID (so a repeat overwrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", message["Message-ID"].strip("<>"))
    path = folder / f"{name}.eml"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(message))
    tmp.replace(path)
    return path
