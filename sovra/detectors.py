"""Detectors for sensitive values in free text (IDs, cards, phones, e-mail, IPs, IBANs, SSNs).

The edge agent runs these before anything leaves the premises.  Each detector returns
:class:`Finding` objects (entity type, character offsets, matched text); :func:`detect` runs a
set of detectors and resolves overlaps.

Design notes:

* Patterns are ASCII-anchored: a value must not be glued to an ASCII letter or digit, but may
  touch CJK text directly ("身份证号110101199003077774，电话13812345678").  ``\\b`` is not used
  because CJK characters count as word characters.
* Every built-in pattern is paired with a validator (check digits, calendar dates, issuer
  ranges, ``ipaddress``) that removes most false positives.
* Full-width digits, letters and ``＠．－＋`` are folded to ASCII before the built-in patterns
  run (a one-to-one code point mapping, so offsets are unchanged); ``Finding.value`` is always the
  original text.
* Quantifiers are bounded, labels are possessive, and the look-behind that anchors a match
  sits after its first character, which keeps a character-set prefix on the compiled pattern
  (the engine skips non-candidates in C) and makes a match attempt proceed only at the start
  of a token.  Scans stay linear on adversarial input ("1"*10**6, "a@"*500_000, ":"*10**6).
* :func:`detect` shares work between built-ins: the text is folded once, the six
  token-shaped types (ID, card, mobile, IPv4, IBAN, SSN) run as one combined scan, e-mail is
  anchored on "@" and IPv6 on "::" or long colon chains.

``Finding.value`` is the sensitive text itself: never log it (its ``repr`` omits it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from sovra import _detector_validators as _v

__all__ = [
    "BUILTIN_TYPES",
    "VALIDATORS",
    "Detector",
    "Finding",
    "KeywordDetector",
    "RegexDetector",
    "UnknownEntityTypeError",
    "Validator",
    "builtin_detector",
    "builtin_detectors",
    "detect",
]

Validator = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: ``text[start:end] == value``.  ``value`` is sensitive: never log it."""

    entity_type: str
    start: int
    end: int
    value: str = field(repr=False)


@runtime_checkable
class Detector(Protocol):
    """Anything with an ``entity_type`` and a ``find`` method can take part in :func:`detect`."""

    entity_type: str

    def find(self, text: str) -> list[Finding]: ...


class UnknownEntityTypeError(ValueError, KeyError):
    """Unknown built-in entity type or validator name (catchable as ValueError or KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


BUILTIN_TYPES: tuple[str, ...] = (
    "CN_RESIDENT_ID",
    "BANK_CARD",
    "CN_MOBILE",
    "EMAIL",
    "IPV4",
    "IPV6",
    "IBAN",
    "US_SSN",
)

#: Named validators that custom detectors (e.g. from a policy file) may reference.
VALIDATORS: Mapping[str, Validator] = MappingProxyType(
    {
        "cn_resident_id": _v.is_cn_resident_id,
        "luhn": _v.luhn_ok,
        "bank_card": _v.is_bank_card,
        "iban_mod97": _v.is_iban,
        "ipv4": _v.is_ipv4,
        "ipv6": _v.is_ipv6,
        "us_ssn": _v.is_us_ssn,
        "cn_mobile": _v.is_cn_mobile,
        "email": _v.is_email,
    }
)


def _resolve_validator(validator: Validator | str | None) -> Validator | None:
    if validator is None or callable(validator):
        return validator
    try:
        return VALIDATORS[validator]
    except KeyError:
        known = ", ".join(sorted(VALIDATORS))
        raise UnknownEntityTypeError(
            f"unknown validator {validator!r}; known validators: {known}"
        ) from None


# --- full-width folding -------------------------------------------------------------------

# Full-width digits, letters and ＠ ． － ＋ ＿ ％ plus the ideographic space map one-to-one onto
# ASCII, so folding never moves offsets.  Full-width CJK punctuation (，：（）) is left alone.
_FULLWIDTH_CLASS = (
    "[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\uff20\uff0e\uff0d\uff0b\uff3f\uff05\u3000]"
)
# "[c][c]*" rather than "[c]+": a leading character class lets the engine skip ahead in C.
_FULLWIDTH_RUN = re.compile(_FULLWIDTH_CLASS + _FULLWIDTH_CLASS + "*")
_FOLD_TABLE = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def _fold_run(match: re.Match[str]) -> str:
    return match.group().translate(_FOLD_TABLE)


def _fold_width(text: str) -> str:
    if _FULLWIDTH_RUN.search(text) is None:
        return text
    return _FULLWIDTH_RUN.sub(_fold_run, text)


# --- detectors ----------------------------------------------------------------------------


class RegexDetector:
    """Reports every non-empty match of ``pattern`` that ``validator`` (if any) accepts.

    ``validator`` is a callable taking the matched text, or the name of one of
    :data:`VALIDATORS` (``"luhn"``, ``"iban_mod97"``, ...).  Matches are non-overlapping,
    scanning left to right; a rejected match does not make the scan retry inside it.
    """

    # Built-in detectors scan the full-width-folded text.
    _folds_width: bool = False

    def __init__(
        self,
        entity_type: str,
        pattern: str,
        validator: Validator | str | None = None,
        flags: int = 0,
    ) -> None:
        if not entity_type:
            raise ValueError("entity_type must be a non-empty string")
        try:
            self._regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"invalid pattern for {entity_type}: {exc}") from exc
        self.entity_type = entity_type
        self._validator = _resolve_validator(validator)

    @property
    def pattern(self) -> str:
        return self._regex.pattern

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.entity_type!r})"

    def find(self, text: str) -> list[Finding]:
        if self._folds_width:
            return self._find(text, _fold_width(text))
        return self._find(text, text)

    def _check(self, candidate: str) -> tuple[int, int]:
        """(length of the accepted prefix of a match or 0, characters the scan moves past)."""
        n = len(candidate)
        if self._validator is None or self._validator(candidate):
            return n, n
        return 0, n

    def _find(self, text: str, scan: str) -> list[Finding]:
        """Scan ``scan`` (``text`` or its folded twin, same length); report slices of ``text``."""
        entity_type, check = self.entity_type, self._check
        found: list[Finding] = []
        for match in self._regex.finditer(scan):
            start, end = match.span()
            if start == end:
                continue
            length = check(match.group())[0]
            if length:
                found.append(
                    Finding(entity_type, start, start + length, text[start : start + length])
                )
        return found


class _BuiltinDetector(RegexDetector):
    """Built-in detectors scan full-width-folded text (see :func:`_fold_width`)."""

    _folds_width = True


def _ascii_class_members(cls: str) -> frozenset[str]:
    return frozenset(c for c in map(chr, range(128)) if re.fullmatch(cls, c))


def _ascii_class(chars: frozenset[str]) -> str:
    return "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"


class _TokenDetector(_BuiltinDetector):
    """A pattern that starts a token: ``first`` is a character class that must not follow an
    ASCII letter or digit, ``rest`` the remainder.  ``guard`` = (class, n) promises that the
    ``n`` characters after the first are in that class; checking it first rejects short
    numbers ("3天", "100mg", "2024年") cheaply.  Several token detectors can share one scan
    (:class:`_TokenGate`) because the boundary rule is the same for all of them.
    """

    def __init__(
        self,
        entity_type: str,
        first: str,
        rest: str,
        validator: Validator,
        guard: tuple[str, int],
    ) -> None:
        guard_class, guard_length = guard
        self._first = first
        self._guarded_rest = f"(?={guard_class}{{{guard_length}}})" + rest
        super().__init__(entity_type, _lead(first) + self._guarded_rest, validator)
        self._first_chars = _ascii_class_members(first)
        self._guard_chars = _ascii_class_members(guard_class)
        self._guard_length = guard_length

    def _find(self, text: str, scan: str) -> list[Finding]:
        entity_type, check, search = self.entity_type, self._check, self._regex.search
        found: list[Finding] = []
        match = search(scan)
        while match is not None:
            start = match.start()
            length, consumed = check(match.group())
            if length:
                found.append(
                    Finding(entity_type, start, start + length, text[start : start + length])
                )
            match = search(scan, start + max(consumed, 1))
        return found


class _IbanDetector(_TokenDetector):
    def _check(self, candidate: str) -> tuple[int, int]:
        n = len(candidate)
        if " " not in candidate:
            return (n, n) if _v.is_iban(candidate) else (0, n)
        # A grouped IBAN may be followed by an unrelated 4-character group ("BE68 5390 0754 7034
        # 2023", "... IBAN FR76 ..."): for a known country, cut at its registered length.  When
        # nothing validates, the scan resumes after the country code and check digits.
        expected = _v.iban_expected_length(candidate[:2])
        cut = n if expected is None else expected + (expected - 1) // 4  # 1 space per 4 chars
        if (cut == n or (cut < n and candidate[cut] == " ")) and _v.is_iban(candidate[:cut]):
            return cut, cut
        return 0, 4


class _Ipv6Detector(_BuiltinDetector):
    """Anchored on "::" or a run of six colon-separated groups, which times ("12:30:45"),
    ratios and prose never contain; the address start is then found by scanning back."""

    _GATE = re.compile(r":(?::|(?:[0-9A-Fa-f]{1,4}:){5})")
    _RUN = re.compile(r"[0-9A-Fa-f:]*")
    _HEX_COLON = frozenset("0123456789abcdefABCDEF:")

    def _find(self, text: str, scan: str) -> list[Finding]:
        found: list[Finding] = []
        search, match_at, run_chars = self._GATE.search, self._regex.match, self._HEX_COLON
        resume = 0
        hit = search(scan)
        while hit is not None:
            start = anchor = hit.start()
            floor = max(anchor - 45, resume)
            while start > floor and scan[start - 1] in run_chars:
                start -= 1
            match = match_at(scan, start)
            if match is None:
                # Only the start of a hex/colon run can start an address, and this run's start
                # failed: skip the whole run (keeps "::::..." linear).
                run = self._RUN.match(scan, anchor)  # "*": always matches
                hit = search(scan, max(run.end() if run else 0, anchor + 1))
                continue
            length = self._check(match.group())[0]
            if length:
                found.append(
                    Finding(self.entity_type, start, start + length, text[start : start + length])
                )
            resume = match.end()
            hit = search(scan, max(resume, anchor + 1))
        return found

    def _check(self, candidate: str) -> tuple[int, int]:
        n = len(candidate)
        if _v.is_ipv6(candidate):
            return n, n
        # "fe80::1:" at the end of a clause: drop a single trailing colon.
        trimmed = candidate[:-1]
        if candidate.endswith(":") and not candidate.endswith("::") and _v.is_ipv6(trimmed):
            return n - 1, n
        return 0, n


class _EmailDetector(_BuiltinDetector):
    """Anchored on "@": the pattern matches "@domain", the local part is read backwards."""

    _LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")

    def _find(self, text: str, scan: str) -> list[Finding]:
        if "@" not in scan:
            return []
        found: list[Finding] = []
        local_chars, previous_end = self._LOCAL, 0
        for match in self._regex.finditer(scan):
            at, end = match.span()
            start, floor = at, max(at - 64, previous_end)
            while start > floor and scan[start - 1] in local_chars:
                start -= 1
            if start == at or (start > previous_end and scan[start - 1] in local_chars):
                continue  # no local part, or one longer than 64 characters
            if self._check(scan[start:end])[0]:
                found.append(Finding(self.entity_type, start, end, text[start:end]))
                previous_end = end
        return found


class _TokenGate:
    """One scan for several token detectors instead of one scan each.

    The gate is ``[all first chars](boundary)(guard)`` followed, for every member ``i``, by an
    optional look-ahead capture ``(?:(?=(?P<_i>rest_i))|)`` and a final condition that at least
    one of them matched.  So it matches exactly at the positions where some member pattern
    matches, and one match object tells which members match there and where each match ends
    (a look-ahead follows the same path through ``rest_i`` as the member's own pattern).  Each
    member resumes where its own previous match let it, so the result per member is identical
    to running that member alone.
    """

    def __init__(self, members: tuple[_TokenDetector, ...]) -> None:
        union = _ascii_class(frozenset().union(*(m._first_chars for m in members)))
        guard_class = _ascii_class(frozenset().union(*(m._guard_chars for m in members)))
        guard = f"(?={guard_class}{{{min(m._guard_length for m in members)}}})"
        captures, any_matched = [], "(?!)"
        for i, member in enumerate(members):
            rest = member._guarded_rest
            rest = rest.replace("(?P<", f"(?P<_{i}_").replace("(?P=", f"(?P=_{i}_")
            captures.append(f"(?:(?=(?P<_{i}>(?<={member._first}){rest}))|)")
            any_matched = f"(?(_{i})|{any_matched})"
        self._gate = re.compile(_lead(union) + guard + "".join(captures) + any_matched)
        self._groups = tuple(self._gate.groupindex[f"_{i}"] for i in range(len(members)))
        self._members = members

    def scan(self, text: str, scan: str) -> list[list[Finding]]:
        members = self._members
        found: list[list[Finding]] = [[] for _ in members]
        resume = [0] * len(members)
        slots = tuple(enumerate(zip(self._groups, members, found, strict=True)))
        search = self._gate.search
        hit = search(scan)
        while hit is not None:
            pos = hit.start()
            spans = hit.regs
            for i, (group, member, out) in slots:
                end = spans[group][1]
                if end < 0 or pos < resume[i]:
                    continue
                length, consumed = member._check(scan[pos:end])
                resume[i] = pos + max(consumed, 1)
                if length:
                    out.append(
                        Finding(member.entity_type, pos, pos + length, text[pos : pos + length])
                    )
            hit = search(scan, pos + 1)
        return found


_GATES: dict[tuple[_TokenDetector, ...], _TokenGate] = {}


def _gate_for(members: tuple[_TokenDetector, ...]) -> _TokenGate:
    gate = _GATES.get(members)
    if gate is None:
        if len(_GATES) >= 64:
            _GATES.clear()
        gate = _GATES[members] = _TokenGate(members)
    return gate


class KeywordDetector:
    """Finds literal keywords (names, project code names, ...), longest keyword first.

    A keyword that starts (ends) with an ASCII letter or digit must not be preceded (followed)
    by one, so ``"Ann"`` does not fire inside ``"Annual"``; CJK keywords match anywhere.
    """

    def __init__(
        self, entity_type: str, keywords: Sequence[str], case_sensitive: bool = False
    ) -> None:
        if not entity_type:
            raise ValueError("entity_type must be a non-empty string")
        if isinstance(keywords, str):
            raise TypeError("keywords must be a sequence of strings, not a single string")
        words: list[str] = []
        seen: set[str] = set()
        for keyword in keywords:
            if not isinstance(keyword, str) or not keyword:
                raise ValueError("keywords must be non-empty strings")
            if not case_sensitive and len(keyword.lower()) == len(keyword):
                keyword = keyword.lower()
            if keyword not in seen:
                seen.add(keyword)
                words.append(keyword)
        self.entity_type = entity_type
        self.case_sensitive = case_sensitive
        flags = 0 if case_sensitive else re.IGNORECASE
        self._regex = re.compile(_trie_pattern(words), flags) if words else None

    def __repr__(self) -> str:
        return f"KeywordDetector({self.entity_type!r})"

    def find(self, text: str) -> list[Finding]:
        if self._regex is None:
            return []
        entity_type = self.entity_type
        return [
            Finding(entity_type, m.start(), m.end(), m.group()) for m in self._regex.finditer(text)
        ]


_AN = "0-9A-Za-z"


def _is_ascii_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


class _TrieNode:
    __slots__ = ("children", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.terminal = False


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex trie for ``words``: alternatives share their common prefixes."""
    root = _TrieNode()
    for word in words:
        node = root
        for ch in word:
            node = node.children.setdefault(ch, _TrieNode())
        node.terminal = True
    branches = []
    for ch, child in sorted(root.children.items()):
        head = re.escape(ch)
        if _is_ascii_alnum(ch):  # look-behind after the first char keeps a charset prefix
            head += f"(?<![{_AN}]{head})"
        branches.append(head + _render_trie(child, ch))
    return "(?:" + "|".join(branches) + ")"


def _render_trie(node: _TrieNode, last: str) -> str:
    chain = []
    while not node.terminal and len(node.children) == 1:
        ((last, node),) = node.children.items()
        chain.append(re.escape(last))
    children = sorted(node.children.items())
    branches = [re.escape(ch) + _render_trie(child, ch) for ch, child in children]
    if node.terminal:  # after the longer continuations, so the longest keyword wins
        branches.append(f"(?![{_AN}])" if _is_ascii_alnum(last) else "")
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return "".join(chain) + body


# --- built-in patterns --------------------------------------------------------------------


def _lead(cls: str) -> str:
    """First character ``cls``, not preceded by an ASCII letter or digit.

    The look-behind follows the first character instead of preceding it so that the compiled
    pattern keeps a character-set prefix (the engine then skips non-candidates in C).
    """
    return f"{cls}(?<![{_AN}]{cls})"


_NOT_AFTER = f"(?![{_AN}])"

# Token patterns are (first character class, rest); _TokenDetector adds the boundary rule.
_ID_FIRST = "[1-8]"
_ID_REST = (
    r"[0-9]{5}(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]"
    + _NOT_AFTER
)

# 13-19 digits, or groups of four separated by one consistent space/hyphen, or Amex 4-6-5.
# A grouped number must not continue a longer grouped digit run on either side, nor the
# groups of an IBAN ("GB61 LKUG 3976 7951 0183 31").
_CARD_FIRST = "[2-6]"
_CARD_REST = (
    "(?:"
    + r"[0-9]{12,18}+"
    + _NOT_AFTER
    + r"|(?<![0-9][ \-][2-6])(?<![A-Z]{2}[0-9]{2} [A-Z0-9]{4} [2-6])"
    + r"[0-9]{3}(?P<s>[ \-])[0-9]{4}(?P=s)[0-9]{4}(?P=s)"
    + r"(?:[0-9]{4}(?:(?P=s)[0-9]{1,3})?|[0-9]{1,3})"
    + _NOT_AFTER
    + r"(?!(?P=s)[0-9])"
    + r"|(?<![0-9][ \-]3)(?<=3)[47][0-9]{2}(?P<a>[ \-])[0-9]{6}(?P=a)[0-9]{5}"
    + _NOT_AFTER
    + r"(?!(?P=a)[0-9])"
    + ")"
)

# Optional +86 / 0086 / 86 prefix (optional space or hyphen), then 1[3-9]x xxxx xxxx.
_MOBILE_FIRST = "[+018]"
_MOBILE_REST = (
    r"(?:(?<=\+)86[ \-]?1|(?<=0)086[ \-]?1|(?<=8)6[ \-]?1|(?<=1))"
    + r"[3-9][0-9](?P<s>[ \-]?)[0-9]{4}(?P=s)[0-9]{4}"
    + _NOT_AFTER
)

# Internationalised TLDs in Han / kana / Hangul script.  Chinese text has no spaces, so after
# "医院.中国" the next word follows directly: these TLDs are matched from a closed list (longest
# first) instead of as "all following letters".  Other non-ASCII TLDs (рф, ελ, ...) are letters.
_CJK_TLDS = (
    "中国", "中國", "公司", "网络", "網絡", "香港", "台湾", "台灣", "澳門", "澳门",
    "新加坡", "在线", "集团", "政务", "政府", "公益", "商城", "商店", "商标", "网址",
    "网店", "网站", "移动", "手机", "信息", "游戏", "企业", "娱乐", "时尚", "购物",
    "健康", "餐厅", "广东", "佛山", "我爱你", "机构", "组织机构", "世界", "八卦", "慈善",
    "招聘", "中信", "中文网", "コム", "みんな", "한국", "닷컴", "닷넷", "삼성",
)  # fmt: skip
_CJK_RANGES = "\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"

# "@" and the domain; _EmailDetector reads the local part (A-Z a-z 0-9 . _ % + -) backwards.
# A label is either CJK only or free of CJK (ASCII, Latin, Cyrillic, ... letters, digits, "-"),
# so "x@qq.com请发送至y.z@..." does not read "com请发送至y" as a label.
# The two alternatives of a label character are disjoint and labels are possessive: a label
# can be split into characters in only one way (no exponential backtracking on "x@aaaa...").
_NON_CJK_LABEL = rf"(?:[A-Za-z0-9\-]|(?![\x00-\x7f{_CJK_RANGES}])[^\W_]){{1,63}}+"
_CJK_LABEL = rf"[{_CJK_RANGES}]{{1,63}}+"
_EMAIL_DOMAIN_PATTERN = (
    rf"@(?:(?:{_NON_CJK_LABEL}|{_CJK_LABEL})\.){{1,8}}"
    # TLD: ASCII letters (may touch CJK text), a known CJK TLD, or other non-ASCII letters
    + r"(?:[A-Za-z]{2,63}(?![A-Za-z0-9\-])"
    + "|(?:"
    + "|".join(sorted(_CJK_TLDS, key=len, reverse=True))
    + ")"
    + rf"|(?:(?![A-Za-z{_CJK_RANGES}])[^\W\d_]){{2,63}}(?![\w\-]))"
)


def _is_email(value: str) -> bool:
    return "_" not in value.rpartition("@")[2] and _v.is_email(value)


# Not part of a longer dotted run either: "1.2.3.4.5" is a version, not an address.
_IPV4_FIRST = "[0-9]"
_IPV4_REST = r"(?<![0-9]\.[0-9])[0-9]{0,2}+(?:\.[0-9]{1,3}+){3}" + _NOT_AFTER + r"(?!\.[0-9])"

# Candidate: starts with "::" or "h{1,4}:", hex digits and colons, optional dotted-quad tail.
# ipaddress decides; times such as 12:30:45 and MAC addresses are rejected there.
_IPV6_PATTERN = (
    r"[0-9A-Fa-f:](?<![0-9A-Za-z:.][0-9A-Fa-f:])[0-9A-Fa-f]{0,3}:[0-9A-Fa-f:]{1,38}"
    r"(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?"
    r"(?![0-9A-Za-z:])(?!\.[0-9])"
)

# Country code, check digits, then 11-30 alphanumerics, or groups of four separated by spaces.
_IBAN_FIRST = "[A-Z]"
_IBAN_REST = (
    r"[A-Z][0-9]{2}(?:[A-Z0-9]{11,30}+"
    + _NOT_AFTER
    + r"|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?"
    + _NOT_AFTER
    + ")"
)

# AAA-GG-SSSS or AAA GG SSSS, not continuing a hyphenated number or followed by more groups.
_SSN_FIRST = "[0-9]"
_SSN_REST = (
    r"(?<![0-9]-[0-9])[0-9]{2}(?P<s>[ \-])[0-9]{2}(?P=s)[0-9]{4}" + _NOT_AFTER + r"(?!(?P=s)[0-9])"
)

_BUILTINS: dict[str, RegexDetector] = {
    "CN_RESIDENT_ID": _TokenDetector(
        "CN_RESIDENT_ID", _ID_FIRST, _ID_REST, _v.is_cn_resident_id, ("[0-9]", 16)
    ),
    "BANK_CARD": _TokenDetector(
        "BANK_CARD", _CARD_FIRST, _CARD_REST, _v.is_bank_card, (r"[0-9 \-]", 12)
    ),
    "CN_MOBILE": _TokenDetector(
        "CN_MOBILE", _MOBILE_FIRST, _MOBILE_REST, _v.is_cn_mobile, (r"[0-9 \-]", 10)
    ),
    "EMAIL": _EmailDetector("EMAIL", _EMAIL_DOMAIN_PATTERN, _is_email),
    "IPV4": _TokenDetector("IPV4", _IPV4_FIRST, _IPV4_REST, _v.is_ipv4, (r"[0-9.]", 6)),
    "IPV6": _Ipv6Detector("IPV6", _IPV6_PATTERN, _v.is_ipv6),
    "IBAN": _IbanDetector("IBAN", _IBAN_FIRST, _IBAN_REST, _v.is_iban, ("[0-9A-Z ]", 14)),
    "US_SSN": _TokenDetector("US_SSN", _SSN_FIRST, _SSN_REST, _v.is_us_ssn, (r"[0-9 \-]", 10)),
}


def builtin_detector(entity_type: str) -> Detector:
    """The built-in detector for ``entity_type`` (one of :data:`BUILTIN_TYPES`).

    Raises :class:`UnknownEntityTypeError` (a ``ValueError`` and ``KeyError``) otherwise.
    Detectors are stateless and shared.
    """
    try:
        return _BUILTINS[entity_type]
    except (KeyError, TypeError):
        raise UnknownEntityTypeError(
            f"unknown built-in entity type {entity_type!r}; "
            f"built-in types are: {', '.join(BUILTIN_TYPES)}"
        ) from None


def builtin_detectors(types: Sequence[str] = BUILTIN_TYPES) -> tuple[Detector, ...]:
    """Built-in detectors for ``types``, in the given order (default: all, ID before card)."""
    return tuple(builtin_detector(t) for t in types)


# --- running a set of detectors -----------------------------------------------------------


def detect(text: str, detectors: Sequence[Detector]) -> list[Finding]:
    """Run ``detectors`` over ``text`` and return non-overlapping findings sorted by start.

    Overlaps are resolved greedily: the earliest start wins, then the longest span, then the
    detector listed first (so list CN_RESIDENT_ID before BANK_CARD, as :data:`BUILTIN_TYPES`
    does, and an 18-digit resident ID that is also Luhn-valid is reported as an ID).

    Built-in detectors share work here: the text is folded once, and the token-based ones
    (ID, card, mobile, IPv4, IBAN, SSN) run as one combined scan with identical results.
    """
    if not text:
        return []
    detectors = tuple(detectors)
    per_detector: list[list[Finding] | None] = [None] * len(detectors)
    folded: str | None = None
    token_ranks: list[int] = []
    token_members: list[_TokenDetector] = []
    for rank, detector in enumerate(detectors):
        if isinstance(detector, _TokenDetector):
            token_ranks.append(rank)
            token_members.append(detector)
    if len(token_members) > 1:
        folded = _fold_width(text)
        gate = _gate_for(tuple(token_members))
        for rank, found in zip(token_ranks, gate.scan(text, folded), strict=True):
            per_detector[rank] = found
    for rank, detector in enumerate(detectors):
        if per_detector[rank] is not None:
            continue
        if isinstance(detector, RegexDetector) and detector._folds_width:
            if folded is None:
                folded = _fold_width(text)
            per_detector[rank] = detector._find(text, folded)
        else:
            per_detector[rank] = detector.find(text)
    # Concatenate in detector order; the sort is stable, so equal spans keep that order.
    candidates = [f for found in per_detector if found for f in found if f.end > f.start]
    candidates.sort(key=_overlap_key)
    resolved: list[Finding] = []
    covered_to = 0
    for finding in candidates:
        if finding.start >= covered_to:
            resolved.append(finding)
            covered_to = finding.end
    return resolved


def _overlap_key(finding: Finding) -> tuple[int, int]:
    return finding.start, finding.start - finding.end
