"""Checksum and structure validators used by :mod:`sovra.detectors`.

Internal module.  Every function takes the text a pattern matched (possibly still
containing the separators the pattern allows) and returns ``True`` when the value is
structurally valid.  The functions never raise on odd input: anything unexpected is
simply ``False``.  None of them logs or stores the value it is given.
"""

from __future__ import annotations

import ipaddress
from datetime import date
from operator import mul


def _is_ascii_digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _strip_separators(value: str) -> str:
    """``value`` without spaces and hyphens."""
    if " " in value:
        value = value.replace(" ", "")
    if "-" in value:
        value = value.replace("-", "")
    return value


# --- mainland China resident identity number (GB 11643-1999) -----------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK_CHARS = "10X98765432"
_ID_WEIGHT_SUM = sum(_ID_WEIGHTS)
_ID_EARLIEST_BIRTH = date(1900, 1, 1)
_IMPORT_DAY = date.today()  # "today" only moves forward: birth dates up to here need no clock


def cn_resident_id_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character for the first 17 digits of a resident ID."""
    if len(first17) != 17 or not _is_ascii_digits(first17):
        raise ValueError("expected 17 ASCII digits")
    # Iterating bytes yields code points: subtract 48 ("0") times the weight sum.
    total = sum(map(mul, first17.encode(), _ID_WEIGHTS)) - 48 * _ID_WEIGHT_SUM
    return _ID_CHECK_CHARS[total % 11]


def is_cn_resident_id(value: str, today: date | None = None) -> bool:
    """18-character resident ID: region code, real birth date in [1900-01-01, today], check."""
    if len(value) != 18:
        return False
    body, check = value[:17], value[17].upper()
    if not _is_ascii_digits(body) or body[0] not in "12345678":
        return False
    try:
        born = date(int(body[6:10]), int(body[10:12]), int(body[12:14]))
    except ValueError:  # Feb 30, month 13, ...
        return False
    if born < _ID_EARLIEST_BIRTH:
        return False
    if (today is not None or born > _IMPORT_DAY) and born > (today or date.today()):
        return False
    return check == cn_resident_id_check_char(body)


# --- payment cards ---------------------------------------------------------------------------


# Every second digit from the right is doubled; this maps a digit to the digit sum of its double.
_LUHN_DOUBLE = str.maketrans("0123456789", "0246813579")


def luhn_ok(value: str) -> bool:
    """Luhn (mod 10) check over the digits of ``value``; spaces and hyphens are ignored."""
    digits = _strip_separators(value)
    if len(digits) < 2 or not _is_ascii_digits(digits):
        return False
    # Digit sum via code points: sum(bytes) - 48 * len.
    total = sum(digits[-1::-2].encode()) + sum(digits[-2::-2].translate(_LUHN_DOUBLE).encode())
    return (total - 48 * len(digits)) % 10 == 0


def card_scheme_ok(digits: str) -> bool:
    """True when ``digits`` has the issuer prefix and a length of a major card scheme.

    UnionPay 62 (16-19), Visa 4 (13/16/19), Mastercard 51-55 and 2221-2720 (16), Amex 34/37
    (15), JCB 35 (16-19), Discover 6011/644-649/65 (16-19), Diners 300-305/36/38/39 (14-19),
    Mir 2200-2204 (16-19).  Maestro (50/56-69, 12-19 digits) is deliberately not accepted: its
    ranges and lengths are so loose that Luhn alone would let 1 in 10 digit runs through.
    """
    n = len(digits)
    if n < 13 or n > 19 or not _is_ascii_digits(digits):
        return False
    two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16
    if two in (34, 37):
        return n == 15
    if two in (35, 62, 65) or four == 6011 or 644 <= three <= 649 or 2200 <= four <= 2204:
        return n >= 16
    return (two in (36, 38, 39) or 300 <= three <= 305) and n >= 14


def is_bank_card(value: str) -> bool:
    """13-19 digits (separators allowed) of a known scheme (prefix and length), Luhn-valid."""
    digits = _strip_separators(value)
    return card_scheme_ok(digits) and luhn_ok(digits)


# --- mainland China mobile numbers ----------------------------------------------------------


def is_cn_mobile(value: str) -> bool:
    """11-digit mainland mobile number ``1[3-9]x xxxx xxxx``, optional +86 / 0086 / 86 prefix."""
    digits = _strip_separators(value)
    if digits.startswith("+"):
        digits = digits[1:]
        if not digits.startswith("86"):
            return False
    if len(digits) == 15 and digits.startswith("0086"):
        digits = digits[4:]
    elif len(digits) == 13 and digits.startswith("86"):
        digits = digits[2:]
    if len(digits) != 11 or not _is_ascii_digits(digits):
        return False
    return digits[0] == "1" and digits[1] in "3456789"


# --- IP addresses ---------------------------------------------------------------------------


def is_ipv4(value: str) -> bool:
    """Dotted-quad IPv4 address; octets <= 255 and no leading zeros (``01.2.3.4`` is rejected)."""
    if not value.isascii():
        return False
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def is_ipv6(value: str) -> bool:
    """IPv6 address in full, compressed (``::``) or IPv4-embedded form, without a zone id."""
    if not value.isascii() or "%" in value:
        return False
    if "::" not in value and value.count(":") < 6:  # cheap reject: times, ratios, MACs
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


# --- IBAN (ISO 13616) -----------------------------------------------------------------------

#: Registered IBAN lengths per country (SWIFT IBAN registry).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip
IBAN_MIN_LENGTH = 15
_IBAN_LETTER_VALUES = str.maketrans({chr(65 + i): str(10 + i) for i in range(26)})  # A=10..Z=35
IBAN_MAX_LENGTH = 34


def iban_expected_length(country: str) -> int | None:
    """Registered length for ``country``, or ``None`` when the country is not in the table."""
    return IBAN_LENGTHS.get(country)


def is_iban(value: str) -> bool:
    """IBAN (spaces allowed): country, 2 check digits, BBAN; length per country; mod 97 == 1."""
    compact = value.replace(" ", "")
    n = len(compact)
    if not IBAN_MIN_LENGTH <= n <= IBAN_MAX_LENGTH:
        return False
    country, check = compact[:2], compact[2:4]
    if not (country.isascii() and country.isalpha() and country.isupper()):
        return False
    if not _is_ascii_digits(check) or check in ("00", "01", "99"):
        return False
    bban = compact[4:]
    if not (bban.isascii() and bban.isalnum()) or bban != bban.upper():
        return False
    expected = IBAN_LENGTHS.get(country)
    if expected is not None and n != expected:
        return False
    return int((bban + compact[:4]).translate(_IBAN_LETTER_VALUES)) % 97 == 1


# --- US social security number --------------------------------------------------------------


def is_us_ssn(value: str) -> bool:
    """``AAA-GG-SSSS`` (dashes or spaces): area not 000/666/9xx, group not 00, serial not 0000."""
    digits = _strip_separators(value)
    if len(digits) != 9 or not _is_ascii_digits(digits):
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9":
        return False
    return group != "00" and serial != "0000"


# --- e-mail addresses -----------------------------------------------------------------------


def is_email(value: str) -> bool:
    """Length and dot rules the e-mail pattern cannot express (local <= 64, domain <= 253)."""
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or len(local) > 64 or len(domain) > 253:
        return False
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    labels = domain.split(".")
    return len(labels) >= 2 and all(
        label and not label.startswith("-") and not label.endswith("-") for label in labels
    )
