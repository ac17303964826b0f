"""Who may call and for how long: the bearer token and each request's deadline, checked before
any work."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from kserve.errors import InvalidInput

from ..errors import Unauthorized


@dataclass(frozen=True)
class Policy:
    """How requests are admitted and bounded, and when the worker counts as stuck."""

    request_timeout_s: float = 600.0
    stuck_after_s: float = 600.0
    api_key: str | None = None


TIMEOUT_HEADER = "x-request-timeout"


@dataclass(frozen=True)
class Call:
    """One admitted request: its id and how long it may take."""

    request_id: str
    timeout_s: float


def admit(policy: Policy, headers: dict[str, str], request_id: str) -> Call:
    """Check the bearer token and work out the deadline, before any work."""
    key = policy.api_key
    if key is not None:
        given = headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <key>)")
    timeout = policy.request_timeout_s
    if TIMEOUT_HEADER in headers:
        try:
            timeout = float(headers[TIMEOUT_HEADER])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 86400:  # NaN fails this too
            raise InvalidInput(f"{TIMEOUT_HEADER} header: must be seconds in (0, 86400], got {headers[TIMEOUT_HEADER]!r}")
    return Call(request_id, timeout)
