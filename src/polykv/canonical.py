"""Canonical JSON (RFC 8785, JCS): one byte sequence per JSON value, so hashes of plans and data are portable.

Objects are written with their keys sorted by UTF-16 code units, without whitespace; strings escape only `"`, `\\`
and the C0 controls (the short forms \\b \\f \\n \\r \\t, else \\u00xx in lower-case hex), everything else is
written as is; numbers are IEEE doubles written the way ECMAScript's Number.prototype.toString writes them (the
shortest digits that read back to the same double, exponent notation only below 1e-6 or from 1e21 on). The caller
encodes the text as UTF-8 before hashing. Any language with a JCS library computes the same bytes.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def canonical_json(value: Any) -> str:
    """The RFC 8785 canonical text of `value` (dict with str keys, list/tuple, str, int, finite float, bool, None).

    Raises ValueError for NaN, infinities, integers a double cannot hold exactly and lone surrogates (none of
    which I-JSON allows), TypeError for any other type or a non-string key.
    """
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.inf
        if as_float != value:
            raise ValueError(f"integer {value} is not exactly representable as an IEEE double (RFC 8785 numbers)")
        out.append(number(as_float))
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"canonical JSON object keys must be strings, got {type(key).__name__}")
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16)):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"canonical JSON cannot represent {type(value).__name__}")


def _utf16(key: str) -> bytes:
    """Sort key: UTF-16BE bytes compare exactly like sequences of UTF-16 code units."""
    return key.encode("utf-16-be", "surrogatepass")


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            raise ValueError(f"lone surrogate U+{ord(ch):04X} cannot be written as UTF-8 (RFC 8785 strings)")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def number(x: float) -> str:
    """ECMAScript Number::toString of a finite double (RFC 8785 section 3.2.2.3); -0 is written 0."""
    if not math.isfinite(x):
        raise ValueError(f"{x} is not a finite number; canonical JSON (I-JSON) has no NaN or infinity")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that round-trip (the same digits ECMAScript picks); Decimal splits them
    _, digit_tuple, exponent = Decimal(repr(abs(x))).as_tuple()
    all_digits = "".join(map(str, digit_tuple))
    digits = all_digits.rstrip("0")
    exponent = int(exponent) + len(all_digits) - len(digits)
    k = len(digits)  # x = digits x 10^exponent = 0.digits x 10^n
    n = exponent + k
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        body = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + body
