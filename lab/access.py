"""How the lab reaches one of its simulated hypervisors, kept in a 0600 file of its state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Access:
    address: str  # host:port
    user: str
    password: str
    ca_file: Path
    path: str = ""  # the API's path on the address ("/sdk" for vSphere)

    @property
    def url(self) -> str:
        return f"https://{self.address}{self.path}"

    def save(self, file: Path) -> None:
        file.write_text(json.dumps({"address": self.address, "user": self.user,
                                    "password": self.password, "ca_file": str(self.ca_file),
                                    "path": self.path}))
        file.chmod(0o600)

    @classmethod
    def load(cls, file: Path) -> Access | None:
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            return None
        return cls(data["address"], data["user"], data["password"], Path(data["ca_file"]),
                   data.get("path", ""))
