"""A DICOMweb login, read from a file (the site YAML's pacs.credentials, predict's
--store-credentials); its contents are never logged.

The file is JSON: {"username": ..., "password": ...} (HTTP basic) or {"token": ...}
(bearer). Messages name the file and the missing key, never a value.

The same session carries the site's TLS settings (pacs.tls): the CA file that verifies
the PACS' certificate and, for mutual TLS, the client certificate it presents. Retrieval
(client.pacs) and storing (dicom_results.store_dicomweb) both build theirs here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import requests


class CredentialsError(ValueError):
    """The credentials file cannot be used; names the file and the problem, never a value."""


class _SiteCaSession(requests.Session):
    """A session whose `verify` (the site's CA) is what verifies: requests would otherwise let
    REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, set on many hosts, replace it (proxies still come from the environment)."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None:                 # not set for this one request: the session's CA
            settings["verify"] = self.verify
        return settings


def session_with_credentials(path: Path | None, *, ca: Path | None = None,
                             client_cert: tuple[Path, Path] | None = None) -> requests.Session:
    """A requests session that authenticates with the credentials file (if any).

    `ca`: PEM file of the CA(s) the PACS' certificate must chain to (instead of the system's);
    `client_cert`: (certificate, key) PEM files presented for mutual TLS.
    """
    session = _SiteCaSession() if ca is not None else requests.Session()
    if ca is not None:
        session.verify = str(ca)
    if client_cert is not None:
        session.cert = (str(client_cert[0]), str(client_cert[1]))
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


def tls_failure(url: str, err: Exception, ca: Path | None = None) -> str:
    """What a failed TLS handshake with the PACS at `url` means, in one line (no traceback)."""
    reason = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        signer = f"the CA in {ca}" if ca is not None else "a CA this host trusts (name the PACS' CA in pacs.tls.ca)"
        return (f"{url}: TLS: the PACS' certificate was not trusted: not signed by {signer}, "
                f"or issued for another host name ({_ssl_reason(reason)})")
    if "CERTIFICATE_REQUIRED" in reason:
        return f"{url}: TLS: the PACS requires a client certificate (pacs.tls.certificate and pacs.tls.key)"
    return (f"{url}: TLS handshake failed: the PACS did not accept the connection ({_ssl_reason(reason)}); "
            f"check pacs.tls (is the agent's certificate one the PACS trusts?)")


def _ssl_reason(text: str) -> str:
    """OpenSSL's reason code out of requests' nested message (e.g. TLSV1_ALERT_UNKNOWN_CA)."""
    codes = re.findall(r"\[SSL: ([A-Z0-9_]+)\]", text)
    if codes:
        return codes[-1]
    return "it closed the connection: does it require a client certificate?" if "EOF" in text else "SSLError"


def tls_problem(session: requests.Session, url: str, ca: Path | None = None) -> str | None:
    """Why TLS to the https `url` fails, or None: one request before the real ones, since
    dicomweb_client retries each failed request for half a minute before it reports.
    The session is closed when there is a problem (it is of no further use)."""
    if not url.startswith("https://"):
        return None
    try:
        session.head(url, timeout=30, allow_redirects=False).close()
    except requests.exceptions.SSLError as err:
        session.close()
        return tls_failure(url, err, ca)
    except requests.RequestException:
        return None               # not a TLS problem: the real request reports it
    return None
