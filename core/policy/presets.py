"""Named built-in patterns for `kind: preset` rules: PII and secrets, each with a default tag.

Patterns use ASCII semantics and bounded repeats (so the stream hold-back is bounded); a
`validate` function runs in Python on each candidate match (Luhn for card numbers, number ranges
for SSNs, a real parse for IPv6) to keep false positives low.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    pattern: str
    tag: str
    description: str
    validate: Callable[[str], bool] | None = None
    caseless: bool = False


def luhn_ok(text: str) -> bool:
    """True when the digits of `text` pass the Luhn checksum (every real card number does)."""
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ssn_ok(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ipv6_ok(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX = r"[0-9A-Fa-f]{1,4}"

PRESETS: dict[str, Preset] = {
    "email": Preset(
        r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}",
        "[EMAIL]",
        "An email address.",
    ),
    "phone": Preset(
        # Separators are required so that plain 10-digit numbers (order ids) don't fire.
        r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\b\d{3}[ .-])\d{3}[ .-]\d{4}\b|\+\d{1,3}(?:[ .-]\d{2,4}){2,4}\b",
        "[PHONE]",
        "A phone number: North-American style with separators, or international with a leading +.",
    ),
    "credit_card": Preset(
        r"\b(?:\d[ -]?){12,18}\d\b",
        "[CARD]",
        "A payment card number (13-19 digits, spaces or dashes allowed), Luhn-checked.",
        validate=luhn_ok,
    ),
    "us_ssn": Preset(
        r"\b\d{3}-\d{2}-\d{4}\b", "[SSN]", "A US social security number (ddd-dd-dddd, valid ranges).", _ssn_ok
    ),
    "ipv4": Preset(rf"\b(?:{_OCTET}\.){{3}}{_OCTET}\b", "[IP]", "An IPv4 address."),
    "ipv6": Preset(
        rf"\b(?:{_HEX}:){{7}}{_HEX}\b|\b(?:{_HEX}:){{1,6}}(?::{_HEX}){{1,6}}\b|\b(?:{_HEX}:){{1,7}}:",
        "[IP]",
        "An IPv6 address (full or `::`-compressed), checked with a real parser.",
        validate=_ipv6_ok,
    ),
    "openai_key": Preset(
        r"\bsk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,200}", "[SECRET]", "An OpenAI/Anthropic-style `sk-` key."
    ),
    "aws_access_key": Preset(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b", "[SECRET]", "An AWS access key id."),
    "github_token": Preset(
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})\b",
        "[SECRET]",
        "A GitHub token (classic `ghp_…` family or fine-grained `github_pat_…`).",
    ),
    "private_key": Preset(
        # The body class has no '-', so a body stops at the END line; without an END line the match
        # still covers the header and every base64 line after it.
        r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----[A-Za-z0-9+/=\s]{0,4000}"
        r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?",
        "[PRIVATE KEY]",
        "A PEM private-key block (RSA, EC, OpenSSH, PKCS#8 …).",
    ),
    "generic_secret": Preset(
        r"\b(?:api[_-]?key|secret|token|password|passwd)\s{0,3}[:=]\s{0,3}[\"']?[A-Za-z0-9_\-./+=]{12,200}",
        "[SECRET]",
        'An assignment like `api_key = "..."` or `password: ...` with a long value.',
        caseless=True,
    ),
}


def check_preset(name: str) -> Preset:
    """The preset called `name`, or a ValueError listing the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
