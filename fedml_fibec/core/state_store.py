"""Per-device state kept by device id, so any process can serve any device (FIBECFED.md section 5)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, atomic_write_text
from ..errors import ConfigError


_BACKUP = ".before.pt"


class DeviceStateStore:
    """One file per device under `root`, written atomically (temp file, then rename)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, device_id: int, suffix: str) -> Path:
        # Every per-device file shares one stem, so the globs in count() and clear() find them all.
        return self.root / f"device_{int(device_id):05d}{suffix}"

    def path(self, device_id: int) -> Path:
        """File holding a device's state."""
        return self._file(device_id, ".pt")

    # The cross-silo ledger's files live here too, named here, so that count() and clear() know them.
    def backup_path(self, device_id: int) -> Path:
        """The ledger's copy of a device's state from before the exchange it is training."""
        return self._file(device_id, _BACKUP)

    def mark_path(self, device_id: int) -> Path:
        """The ledger's record of that exchange."""
        return self._file(device_id, ".exchange")

    def load(self, device_id: int) -> dict[str, Any]:
        """The device's state, or an empty dict before its first participation."""
        p = self.path(device_id)
        if not p.exists():
            return {}
        return torch.load(p, map_location="cpu", weights_only=False)

    def save(self, device_id: int, state: dict[str, Any]) -> None:
        """Replace the device's state atomically."""
        atomic_write(self.path(device_id), lambda fh: torch.save(state, fh))

    def count(self) -> int:
        """How many devices have a state file (the ledger's backups not counted)."""
        return sum(1 for p in self.root.glob("device_*.pt") if not p.name.endswith(_BACKUP))

    def clear(self) -> int:
        """Remove every device's files (states, and the cross-silo ledger's backups and marks) and nothing
        else; return how many were removed."""
        removed = 0
        for p in [*self.root.glob("device_*.pt"), *self.root.glob("device_*.exchange")]:
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    def check_shared(self, token: str) -> None:
        """Raise ConfigError unless the file written by rank 0 with `token` is visible here."""
        marker = self.root / ".store_token"
        seen = marker.read_text().strip() if marker.exists() else None
        if seen != token:
            raise ConfigError(
                f"state_dir {str(self.root)!r} is not shared between ranks: this rank "
                f"({os.uname().nodename}) cannot see the marker written by rank 0. On a multi-node MPI "
                "cluster set fibec_args.state_dir to a folder every node mounts (e.g. NFS).")

    def write_token(self, token: str) -> None:
        """Written by rank 0 so the other ranks can prove they see the same folder."""
        atomic_write_text(self.root / ".store_token", token)
