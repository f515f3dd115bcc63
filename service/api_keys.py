"""API keys: parsing them from settings and checking a presented key against them.

No HTTP here (that is `service.rest.auth`). Keys are kept only as SHA-256 digests once the
app is built, and a presented key is compared against *every* configured digest with
`hmac.compare_digest`: comparing fixed-length digests hides both where a key differs and how
long the configured keys are, and checking all of them hides which one matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import Iterable

from pydantic import SecretStr

# Visible ASCII, no spaces or commas: what fits in a header and survives the comma-separated form.
KEY_PATTERN = re.compile(r"[!-+\--~]+")


class ApiKeyConfigError(ValueError):
    """A key setting that cannot be used; the message never contains a key."""


def split_keys(value: object) -> object:
    """`CALIB_API_KEYS="k1, k2"` -> ["k1", "k2"]; lists (from Python) pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def check_keys(keys: Iterable[SecretStr], where: str) -> list[SecretStr]:
    keys = list(keys)
    for i, key in enumerate(keys, 1):
        if not KEY_PATTERN.fullmatch(key.get_secret_value()):
            raise ApiKeyConfigError(f"{where}: key #{i} is empty or has characters other than visible "
                                    f"ASCII (no spaces or commas)")
    return keys


def read_key_file(path: Path, setting: str = "CALIB_API_KEYS_FILE") -> list[SecretStr]:
    """One key a line; blank lines and #comments ignored. Unreadable or empty -> ApiKeyConfigError
    (a secrets file that yields no key would otherwise silently leave the service open)."""
    where = f"{setting}={path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ApiKeyConfigError(f"{where}: cannot read the API key file ({reason})") from None
    keys = [SecretStr(s) for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    if not keys:
        raise ApiKeyConfigError(f"{where}: the file holds no API key (only blank lines or #comments)")
    return check_keys(keys, where)


def load_keys(keys: Iterable[SecretStr], key_file: Path | None, setting: str) -> list[SecretStr]:
    """The keys of setting `setting` (e.g. CALIB_API_KEYS) plus those of its `_FILE` companion."""
    loaded = check_keys(keys, setting)
    if key_file is not None:
        loaded += read_key_file(key_file, f"{setting}_FILE")
    return loaded


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key).digest()


class KeyRing:
    """The configured keys, as digests. Empty means authentication is off."""

    def __init__(self, keys: Iterable[SecretStr]) -> None:
        self._digests = tuple({_digest(k.get_secret_value()) for k in keys})

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"KeyRing({len(self)} key(s))"

    def matches(self, presented: str | bytes | None) -> bool:
        """Constant time in the presented key's content: every digest is compared, always."""
        if presented is None:
            return False
        candidate = _digest(presented)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found
