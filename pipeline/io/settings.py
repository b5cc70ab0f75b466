"""What produced an output, recorded beside it (`{output}/_settings.json`), so that a rerun cannot mix two.

A job's output is one result: the embed job's tables are one vector space (one model, one protocol), the
filter job's keep-lists and shards one rule. A rerun resumes only when it would produce the same result;
a rerun with other settings is refused before any work, naming each difference, unless `overwrite=true`.
"""

from __future__ import annotations

import json

from pipeline.config import StorageCfg
from pipeline.io import storage

SETTINGS_FILE = "_settings.json"


class SettingsMismatch(ValueError):
    """A rerun into an output that other settings produced."""


def normalized(settings: dict) -> dict:
    """As JSON gives it back (tuples -> lists), so that recorded and current settings compare equal."""
    return json.loads(json.dumps(settings, sort_keys=True, ensure_ascii=False))


def recorded(output: str, storage_cfg: StorageCfg) -> dict | None:
    fs, root = storage.filesystem(output, storage_cfg)
    path = storage.join(root, SETTINGS_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def differences(before: dict, now: dict) -> list[str]:
    """One phrase per setting that differs: `name: X in the output, Y now`."""
    def shown(value) -> str:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)

    now = normalized(now)
    return [f"{key}: {shown(before.get(key))} in the output, {shown(now.get(key))} now"
            for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]


def check(output: str, storage_cfg: StorageCfg, current: dict, overwrite: bool) -> list[str]:
    """The differences between the output's recorded settings and `current` (none for a new output).
    Raises SettingsMismatch when there are some and overwrite is off."""
    before = recorded(output, storage_cfg)
    found = differences(before, current) if before is not None else []
    if found and not overwrite:
        raise SettingsMismatch(
            f"output {output} was made with other settings ({'; '.join(found)}): rerun with "
            "--set overwrite=true to recompute all of it, or choose another output")
    return found


def record(output: str, storage_cfg: StorageCfg, current: dict) -> None:
    fs, root = storage.filesystem(output, storage_cfg)
    payload = json.dumps(normalized(current), indent=2, ensure_ascii=False, sort_keys=True).encode()
    storage.write_atomically(fs, storage.join(root, SETTINGS_FILE), payload)
