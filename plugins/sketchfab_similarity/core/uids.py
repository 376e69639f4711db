"""Sketchfab model uids: 32 lowercase hex digits. The one definition (sql/010 checks the same)."""

from __future__ import annotations

import re
from typing import Any

UID_PATTERN = r"^[0-9a-f]{32}$"
UID_RE = re.compile(UID_PATTERN)


def is_uid(value: Any) -> bool:
    return isinstance(value, str) and UID_RE.match(value) is not None
