"""Where provisioning material lives on disk, and how it is written.

Writes go through `synth.atomic` (temp file in the same folder, created 0600 and
given its final mode before the rename, so a private key is never readable by others), and
nothing existing is replaced unless the caller says `force`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from synth.atomic import write_atomic

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
# File name of a hospital's `flower-supernode --trusted-entities` YAML.
TRUSTED_ENTITIES_NAME = "trusted-entities.yaml"
# Hospital names become folder and file names and key comments: keep them plain.
_HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ProvisioningError(Exception):
    """A provisioning step refused or failed; the message names the file and why."""


def check_hospital_name(name: str) -> str:
    if not _HOSPITAL_NAME.match(name) or name in {".", ".."}:
        raise ProvisioningError(
            f"hospital name {name!r} is not allowed: use 1-63 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Layout:
    """File names under one provisioning folder (the coordinator's, kept private)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def hospitals_dir(self) -> Path:
        return self.root / "hospitals"

    def hospital_dir(self, name: str) -> Path:
        return self.hospitals_dir / check_hospital_name(name)

    def hospital_key(self, name: str) -> Path:
        return self.hospital_dir(name) / f"{name}.key"

    def hospital_pub(self, name: str) -> Path:
        return self.hospital_dir(name) / f"{name}.pub"

    def hospital_trusted_entities(self, name: str) -> Path:
        """The release key(s) the hospital's SuperNode accepts apps from (--trusted-entities)."""
        return self.hospital_dir(name) / TRUSTED_ENTITIES_NAME

    def hospitals(self) -> list[str]:
        """Names of hospitals that have a public key here, sorted."""
        if not self.hospitals_dir.is_dir():
            return []
        return sorted(p.name for p in self.hospitals_dir.iterdir()
                      if (p / f"{p.name}.pub").is_file())


def refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Raise naming every path that exists, unless `force`. Call before writing any."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ProvisioningError(
            "refusing to overwrite existing file(s) without --force: "
            + ", ".join(existing)
        )


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data, PRIVATE_MODE)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data, PUBLIC_MODE)
