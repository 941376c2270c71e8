"""A DICOMweb login, read from a file (the site YAML's pacs.credentials, predict's
--store-credentials); its contents are never logged.

The file is JSON: {"username": ..., "password": ...} (HTTP basic) or {"token": ...}
(bearer). Messages name the file and the missing key, never a value.
"""
from __future__ import annotations

import json
from pathlib import Path

import requests


class CredentialsError(ValueError):
    """The credentials file cannot be used; names the file and the problem, never a value."""


def session_with_credentials(path: Path | None) -> requests.Session:
    """A requests session that authenticates with the credentials file (if any)."""
    session = requests.Session()
    if path is None:
        return session
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CredentialsError(f"{path}: cannot read the PACS credentials ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise CredentialsError(f"{path}: PACS credentials must be a JSON object")
    if isinstance(raw.get("token"), str):
        session.headers["Authorization"] = f"Bearer {raw['token']}"
    elif isinstance(raw.get("username"), str) and isinstance(raw.get("password"), str):
        session.auth = (raw["username"], raw["password"])
    else:
        raise CredentialsError(f"{path}: PACS credentials need string keys username and password, or token")
    return session
