"""Tests for sovra.detectors: built-in types, validators, overlaps, custom detectors, robustness."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from sovra import _detector_validators as v
from sovra.detectors import (
    BUILTIN_TYPES,
    VALIDATORS,
    Detector,
    Finding,
    KeywordDetector,
    RegexDetector,
    UnknownEntityTypeError,
    builtin_detector,
    builtin_detectors,
    detect,
)

try:
    from tests.detector_corpus import GENERATORS, build_corpus
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from detector_corpus import GENERATORS, build_corpus  # type: ignore[no-redef]

ALL = builtin_detectors()


def values(text: str, entity_type: str | None = None) -> list[tuple[str, str]]:
    """(type, value) of every finding of detect() with all built-ins, optionally one type."""
    return [
        (f.entity_type, f.value)
        for f in detect(text, ALL)
        if entity_type is None or f.entity_type == entity_type
    ]


def only(entity_type: str, text: str) -> list[str]:
    """Values found by the single built-in detector for ``entity_type``."""
    return [f.value for f in builtin_detector(entity_type).find(text)]


def id_with_check(first17: str) -> str:
    return first17 + v.cn_resident_id_check_char(first17)


def luhn_complete(partial: str) -> str:
    for d in "0123456789":
        if v.luhn_ok(partial + d):
            return partial + d
    raise AssertionError("unreachable")


# --- API surface ---------------------------------------------------------------------------------


def test_builtin_types_and_registry() -> None:
    assert BUILTIN_TYPES == (
        "CN_RESIDENT_ID",
        "BANK_CARD",
        "CN_MOBILE",
        "EMAIL",
        "IPV4",
        "IPV6",
        "IBAN",
        "US_SSN",
    )
    for entity_type in BUILTIN_TYPES:
        detector = builtin_detector(entity_type)
        assert detector.entity_type == entity_type
        assert isinstance(detector, Detector)
    assert [d.entity_type for d in ALL] == list(BUILTIN_TYPES)
    assert {"cn_resident_id", "luhn", "iban_mod97", "ipv4", "ipv6", "us_ssn", "cn_mobile"} <= set(
        VALIDATORS
    )


def test_unknown_builtin_is_a_clear_value_and_key_error() -> None:
    with pytest.raises(ValueError, match=r"unknown built-in entity type 'CN_PASSPORT'.*US_SSN"):
        builtin_detector("CN_PASSPORT")
    with pytest.raises(KeyError):
        builtin_detector("cn_resident_id")  # case matters
    try:
        builtin_detector("X")
    except UnknownEntityTypeError as exc:
        assert str(exc).startswith("unknown built-in entity type 'X'")  # not KeyError-quoted


def test_finding_repr_never_shows_the_value() -> None:
    (finding,) = detect("SSN 123-45-6789", ALL)
    assert finding == Finding("US_SSN", 4, 15, "123-45-6789")
    assert "6789" not in repr(finding)
    assert "US_SSN" in repr(finding)


def test_empty_inputs() -> None:
    assert detect("", ALL) == []
    assert detect("no sensitive values here", []) == []
    for detector in ALL:
        assert detector.find("") == []


# --- CN_RESIDENT_ID ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("11010519491231002X", ["11010519491231002X"]),
        ("11010519491231002x", ["11010519491231002x"]),
        ("身份证号110101199003077774，电话", ["110101199003077774"]),
        (f"ID: {id_with_check('44030520000101001')}.", [id_with_check("44030520000101001")]),
        (f"({id_with_check('81000019000101123')})", [id_with_check("81000019000101123")]),
    ],
)
def test_resident_id_positives(text: str, expected: list[str]) -> None:
    assert only("CN_RESIDENT_ID", text) == expected


def test_resident_id_near_misses() -> None:
    good = "110101199003077774"
    assert v.is_cn_resident_id(good)
    wrong_check = good[:17] + ("5" if good[17] != "5" else "6")
    feb30 = id_with_check("11010119900230777")
    month13 = id_with_check("11010119901301777")
    future = id_with_check("11010120991231777")
    before_1900 = id_with_check("11010118991231777")
    region_9 = id_with_check("91010119900307777")
    region_0 = id_with_check("01010119900307777")
    for text in (
        wrong_check,
        feb30,
        month13,
        future,
        before_1900,
        region_9,
        region_0,
        "1" + good,  # inside a longer digit run
        good + "1",
        "A" + good,  # glued to ASCII letters
        good + "b",
        good[:17],
    ):
        assert only("CN_RESIDENT_ID", text) == [], text


def test_resident_id_validator_edges() -> None:
    from datetime import date

    assert v.is_cn_resident_id(id_with_check("11010120000229123"))  # leap day
    assert not v.is_cn_resident_id(id_with_check("11010119000229123"))  # 1900 is not leap
    assert v.is_cn_resident_id(id_with_check("11010119000101123"))
    born_today = id_with_check(f"110101{date.today():%Y%m%d}123")
    assert v.is_cn_resident_id(born_today)
    assert not v.is_cn_resident_id(born_today, today=date(2000, 1, 1))
    for junk in ("", "x" * 18, "１" * 18, "11010519491231002Y", "1101051949123100２X"):
        assert not v.is_cn_resident_id(junk)


# --- BANK_CARD -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",  # Visa
        "4222222222222",  # Visa, 13 digits
        "5555555555554444",  # Mastercard
        "2223000048400011",  # Mastercard 2-series
        "378282246310005",  # Amex
        "3782 822463 10005",  # Amex 4-6-5 grouping
        "6011111111111117",  # Discover
        "3530111333300000",  # JCB
        "6200000000000005",  # UnionPay
        "6222 0212 3456 7890 128",  # UnionPay 19, grouped by spaces
        "4111-1111-1111-1111",
        "4111 1111 1111 1111",
    ],
)
def test_card_positives(card: str) -> None:
    assert only("BANK_CARD", f"卡号{card}，谢谢") == [card]
    assert values(f"Card {card} was charged.") == [("BANK_CARD", card)]


def test_card_near_misses() -> None:
    for text in (
        "4111111111111112",  # Luhn-invalid
        "6222 0212 3456 7890 129",
        "14111111111111111",  # inside a longer digit run
        "41111111111111110",
        "4111 1111 1111 1111 1111",  # a longer grouped run
        "1234 4111 1111 1111 1111",
        "4111-1111 1111-1111",  # inconsistent separators
        "9111111111111111",  # no such issuer
        "5018000000000009",  # Maestro: not accepted (too loose)
        "41111111111111113",  # Visa with 17 digits
        "GB61 LKUG 3976 7951 0183 31",  # digit groups of an IBAN
        "x4111111111111111",
    ):
        assert only("BANK_CARD", text) == [], text


def test_card_validator() -> None:
    assert v.luhn_ok("79927398713")
    assert not v.luhn_ok("79927398710")
    assert not v.luhn_ok("7992739871x")
    assert not v.luhn_ok("")
    assert v.is_bank_card("6222-0212-3456-7890-128")
    assert not v.is_bank_card("４１１１１１１１１１１１１１１１")  # folding is the detector's job


# --- CN_MOBILE -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mobile",
    [
        "13812345678",
        "19912345678",
        "138 1234 5678",
        "138-1234-5678",
        "+86 13812345678",
        "+86-138-1234-5678",
        "+8613812345678",
        "0086 13812345678",
        "008613812345678",
        "8613812345678",
        "86-13812345678",
    ],
)
def test_mobile_positives(mobile: str) -> None:
    assert values(f"电话{mobile}，谢谢") == [("CN_MOBILE", mobile)]
    assert values(f"call {mobile}.") == [("CN_MOBILE", mobile)]


def test_mobile_near_misses() -> None:
    for text in (
        "12812345678",  # second digit must be 3-9
        "138123456789",  # 12 digits
        "1381234567",  # 10 digits
        "213812345678",  # inside a longer run
        "138-1234 5678",  # inconsistent separators
        "tel13812345678",  # glued to ASCII letters
        "13812345678x",
        "+85 13812345678x",
    ):
        assert only("CN_MOBILE", text) == [], text
    assert not v.is_cn_mobile("+1 13812345678")


def test_fullwidth_digits_are_detected_with_original_offsets() -> None:
    text = "电话：１３８１２３４５６７８，身份证１１０１０１１９９００３０７７７７４"
    found = detect(text, ALL)
    assert [(f.entity_type, f.value) for f in found] == [
        ("CN_MOBILE", "１３８１２３４５６７８"),
        ("CN_RESIDENT_ID", "１１０１０１１９９００３０７７７７４"),
    ]
    for f in found:
        assert text[f.start : f.end] == f.value
    assert only("CN_MOBILE", "ｔｅｌ１３８１２３４５６７８") == []  # full-width letters count too


# --- EMAIL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        "zhang.san@hospital.com.cn",
        "john+tag@example.co.uk",
        "x_y-z%1@sub.example.org",
        "user@bücher.de",
        "zhang@医院.中国",
        "info@пример.рф",
        "a@b.io",
    ],
)
def test_email_positives(email: str) -> None:
    assert values(f"请发送至{email}，谢谢") == [("EMAIL", email)]
    assert values(f"mail {email}. Thanks") == [("EMAIL", email)]


def test_email_in_chinese_text_without_spaces() -> None:
    text = "请联系zhang@医院.中国获取报告，或x@qq.com请将报告发送至li.na@bank.com。"
    assert values(text) == [
        ("EMAIL", "zhang@医院.中国"),
        ("EMAIL", "x@qq.com"),
        ("EMAIL", "li.na@bank.com"),
    ]
    assert values("contact billing@example.org.肿瘤科会诊") == [("EMAIL", "billing@example.org")]


def test_email_near_misses() -> None:
    for text in (
        "foo@bar",  # no dot in the domain
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "@example.com",
        "x@y.c",  # one-letter TLD
        "x@-bad.com",
        "x@bad-.com",
        "x@under_score.com",
        "x@exa mple.com",
        "a" * 65 + "@example.com",  # local part too long
        "price 5@3.5",
    ):
        assert only("EMAIL", text) == [], text


# --- IPV4 / IPV6 ---------------------------------------------------------------------------------


def test_ipv4() -> None:
    assert values("登录IP：192.168.1.1，端口8080") == [("IPV4", "192.168.1.1")]
    assert values("server 10.0.0.1:8080 and 8.8.8.8.") == [
        ("IPV4", "10.0.0.1"),
        ("IPV4", "8.8.8.8"),
    ]
    assert values("255.255.255.255 0.0.0.0") == [("IPV4", "255.255.255.255"), ("IPV4", "0.0.0.0")]
    for text in (
        "256.1.1.1",
        "1.2.3.300",
        "01.2.3.4",  # leading zero
        "1.2.3.04",
        "1.2.3.4.5",  # version string
        "v1.2.3.4",
        "1.2.3",
        "1.2.3.4a",
        "11.2.3.4.5.6",
    ):
        assert only("IPV4", text) == [], text


@pytest.mark.parametrize(
    "address",
    [
        "2001:db8::1",
        "fe80::1",
        "::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "2001:DB8:85A3::8A2E:370:7334",
        "::ffff:192.168.1.1",
        "64:ff9b::192.0.2.33",
        "1:2:3:4:5:6:7:8",
        "1::",
    ],
)
def test_ipv6_positives(address: str) -> None:
    assert values(f"地址{address}，ok") == [("IPV6", address)]
    assert values(f"url http://[{address}]:443/x") == [("IPV6", address)]


def test_ipv6_near_misses() -> None:
    for text in (
        "12:30:45",
        "at 12:30:45.123",
        "ratio 1:2:3",
        "00:1a:2b:3c:4d:5e",  # MAC address
        "1:2:3:4:5:6:7",
        "1:2:3:4:5:6:7:8:9",
        "std::vector",
        "::",
        "2001:db8::g1",
        "12345::1",
        "1::2::3",
    ):
        assert only("IPV6", text) == [], text
    assert only("IPV6", "addr fe80::1: down") == ["fe80::1"]


# --- IBAN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
        "CH9300762011623852957",
        "ES9121000418450200051332",
        "IT60X0542811101000000123456",
        "BE68 5390 0754 7034",
    ],
)
def test_iban_positives(iban: str) -> None:
    assert values(f"IBAN {iban}, BIC COBADEFFXXX") == [("IBAN", iban)]
    assert values(f"收款账户{iban}，金额") == [("IBAN", iban)]


def test_iban_near_misses_and_group_boundaries() -> None:
    for text in (
        "DE88 3704 0044 0532 0130 00",  # check digits
        "DE89 3704 0044 0532 0130 01",
        "DE89 3704 0044 0532 0130 0",  # length for DE is 22
        "de89370400440532013000",
        "XDE89370400440532013000",
    ):
        assert only("IBAN", text) == [], text
    # A 4-character word after a grouped IBAN is not part of it.
    assert only("IBAN", "BE68 5390 0754 7034 2023年") == ["BE68 5390 0754 7034"]
    assert only("IBAN", "IBAN BE44 0684 1279 2900 IBAN BE68 5390 0754 7034 ok") == [
        "BE68 5390 0754 7034"
    ]


def test_iban_validator() -> None:
    assert v.is_iban("GB82WEST12345698765432")
    assert not v.is_iban("GB82WEST1234569876543")  # GB is 22 long
    assert v.iban_expected_length("NL") == 18
    assert v.iban_expected_length("ZZ") is None
    # An unknown country only needs 15-34 characters and mod 97 == 1.
    body = "1234567890ABCDEF"
    check = 98 - int("".join(str(int(c, 36)) for c in body + "ZZ00")) % 97
    assert v.is_iban(f"ZZ{check:02d}{body}")
    assert not v.is_iban("ZZ00" + body)


# --- US_SSN --------------------------------------------------------------------------------------


def test_ssn() -> None:
    assert values("SSN 123-45-6789; alt 123 45 6789.") == [
        ("US_SSN", "123-45-6789"),
        ("US_SSN", "123 45 6789"),
    ]
    assert values("SSNs: 123-45-6789 987-65-4321") == [("US_SSN", "123-45-6789")]  # 9xx area
    for text in (
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "999-12-3456",
        "123-00-4567",
        "123-45-0000",
        "123-45-67890",
        "1123-45-6789",
        "123-45 6789",
        "1-123-45-6789",
        "123456789",
    ):
        assert only("US_SSN", text) == [], text


# --- overlaps and detect() -----------------------------------------------------------------------


def _id_that_is_also_a_card() -> str:
    for seq in range(1000):
        candidate = id_with_check(f"62010219900307{seq:03d}")
        if v.is_bank_card(candidate):
            return candidate
    raise AssertionError("no candidate")


def test_resident_id_wins_over_card() -> None:
    both = _id_that_is_also_a_card()
    assert only("BANK_CARD", both) == [both]  # on its own, the card detector fires
    assert values(f"号码{both}。") == [("CN_RESIDENT_ID", both)]
    reordered = [builtin_detector("CN_RESIDENT_ID"), builtin_detector("BANK_CARD")]
    assert [f.entity_type for f in detect(both, reordered)] == ["CN_RESIDENT_ID"]


class _Fixed:
    """A detector returning fixed spans, to test overlap resolution."""

    def __init__(self, entity_type: str, spans: list[tuple[int, int]]) -> None:
        self.entity_type = entity_type
        self.spans = spans

    def find(self, text: str) -> list[Finding]:
        return [Finding(self.entity_type, s, e, text[s:e]) for s, e in self.spans]


def test_overlap_resolution_rules() -> None:
    text = "abcdefghijklmnopqrstuvwxyz"
    a = _Fixed("A", [(0, 5), (10, 12)])
    b = _Fixed("B", [(2, 20)])  # overlaps A's first, starts later: loses
    c = _Fixed("C", [(10, 15)])  # same start as A's second, longer: wins
    d = _Fixed("D", [(22, 24), (3, 3)])  # empty span: ignored
    e = _Fixed("E", [(22, 24)])  # identical span, listed later: loses
    found = detect(text, [a, b, c, d, e])
    assert [(f.entity_type, f.start, f.end) for f in found] == [
        ("A", 0, 5),
        ("C", 10, 15),
        ("D", 22, 24),
    ]
    assert [f.entity_type for f in detect(text, [e, d])] == ["E"]


def test_the_brief_example() -> None:
    text = "身份证号110101199003077774，电话13812345678"
    assert values(text) == [
        ("CN_RESIDENT_ID", "110101199003077774"),
        ("CN_MOBILE", "13812345678"),
    ]


def _reference_detect(text: str) -> list[tuple[str, int, int]]:
    """Each built-in on its own, then the documented overlap rule, written out plainly."""
    spans = []
    for rank, detector in enumerate(ALL):
        for f in detector.find(text):
            assert text[f.start : f.end] == f.value
            spans.append((f.start, -(f.end - f.start), rank, f.entity_type, f.end))
    kept: list[tuple[str, int, int]] = []
    end = 0
    for start, _, _, entity_type, stop in sorted(spans):
        if start >= end:
            kept.append((entity_type, start, stop))
            end = stop
    return kept


def test_combined_scan_equals_detectors_run_one_by_one() -> None:
    corpus = build_corpus(300, seed=99, prose=0.0)
    text = "\n".join(t for t, _ in corpus)
    text += " 110101199003077774 13812345678 6222 0212 3456 7890 128 1.2.3.4.5 a@b.cn ::1 "
    got = [(f.entity_type, f.start, f.end) for f in detect(text, ALL)]
    assert got == _reference_detect(text)
    assert len(got) > 1000


# --- custom detectors ----------------------------------------------------------------------------


def test_regex_detector_with_named_validator() -> None:
    member_card = RegexDetector("MEMBER_CARD", r"(?<=会员卡)[0-9]{16}", validator="luhn")
    good = luhn_complete("880012345678901")
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    text = f"会员卡{good}，会员卡{bad}"
    assert [(f.entity_type, f.value) for f in member_card.find(text)] == [("MEMBER_CARD", good)]
    same = RegexDetector("MEMBER_CARD", r"(?<=会员卡)[0-9]{16}", validator=VALIDATORS["luhn"])
    assert same.find(text) == member_card.find(text)
    mrn = RegexDetector("MRN", r"mrn-\d{6}", flags=re.IGNORECASE)
    assert [f.value for f in detect("MRN-123456 mrn-654321", [mrn])] == ["MRN-123456", "mrn-654321"]


def test_regex_detector_errors() -> None:
    with pytest.raises(ValueError, match="unknown validator 'crc32'"):
        RegexDetector("X", r"\d+", validator="crc32")
    with pytest.raises(KeyError):
        RegexDetector("X", r"\d+", validator="crc32")
    with pytest.raises(ValueError, match="invalid pattern for X"):
        RegexDetector("X", r"(\d+")
    with pytest.raises(ValueError):
        RegexDetector("", r"\d+")
    assert RegexDetector("X", r"a*").find("bbb") == []  # empty matches are not findings


def test_custom_and_builtin_detectors_together() -> None:
    mrn = RegexDetector("MRN", r"MRN-[0-9]{6}")
    text = "MRN-123456 电话13812345678 身份证110101199003077774"
    assert [f.entity_type for f in detect(text, [*ALL, mrn])] == [
        "MRN",
        "CN_MOBILE",
        "CN_RESIDENT_ID",
    ]
    # A custom detector listed first wins an identical span.
    same_as_mobile = RegexDetector("PHONE", r"1[3-9][0-9]{9}")
    assert [f.entity_type for f in detect(text, [same_as_mobile, *ALL])] == [
        "PHONE",
        "CN_RESIDENT_ID",
    ]


def test_keyword_detector() -> None:
    names = KeywordDetector("PATIENT", ["张三", "张三丰", "Ann", "Ann Lee", "C++", "a.b"])
    text = "患者张三丰与张三，Annual report by ANN LEE and ann; C++ a.b axb"
    found = names.find(text)
    assert [f.value for f in found] == ["张三丰", "张三", "ANN LEE", "ann", "C++", "a.b"]
    for f in found:
        assert text[f.start : f.end] == f.value
    strict = KeywordDetector("PATIENT", ["Ann"], case_sensitive=True)
    assert [f.value for f in strict.find("Ann ann ANN")] == ["Ann"]
    assert KeywordDetector("X", []).find("anything") == []
    with pytest.raises(ValueError):
        KeywordDetector("X", ["ok", ""])
    with pytest.raises(TypeError):
        KeywordDetector("X", "张三")
    assert isinstance(names, Detector)


def test_keyword_detector_many_keywords() -> None:
    rng = random.Random(3)
    words = sorted(
        {"".join(rng.choice("abcdef") for _ in range(rng.randrange(3, 9))) for _ in range(3000)}
    )
    detector = KeywordDetector("WORD", words)
    text = " ".join(rng.choice(words) for _ in range(2000))
    assert len(detector.find(text)) == 2000


# --- adversarial and odd input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1" * 1_000_000,
        "a@" * 500_000,
        "6" * 1_000_000,
        "1." * 500_000,
        ":" * 1_000_000,
        "1:" * 500_000,
        "ab:" * 333_333,
        "x@" + "a" * 1_000_000 + ".com",
        "x@" + "ü" * 1_000_000 + ".de",
        "a" * 1_000_000 + "@x.com",
        "1 " * 500_000,
        "1-" * 500_000,
        "+86" * 333_333,
        "DE12 " * 100_000,
        "１" * 1_000_000,
        "\x00" * 1_000_000,
        "😀" * 500_000,
        "患者" * 500_000,
    ],
    ids=lambda t: repr(t[:6]),
)
def test_adversarial_inputs_complete_without_findings(text: str) -> None:
    assert detect(text, ALL) == []


def test_repeated_values_in_huge_text() -> None:
    text = "身份证110101199003077774，" * 20_000
    found = detect(text, ALL)
    assert len(found) == 20_000
    assert {f.value for f in found} == {"110101199003077774"}


def test_odd_characters_do_not_break_detection() -> None:
    text = "\x00😀邮箱a@b.cn\x00\u200b13812345678\ufeff１．２．３．４ \ud800 end"
    assert values(text) == [
        ("EMAIL", "a@b.cn"),
        ("CN_MOBILE", "13812345678"),
        ("IPV4", "１．２．３．４"),
    ]


# --- corpus --------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_gold_is_valid() -> None:
    first, again = build_corpus(50, seed=1), build_corpus(50, seed=1)
    assert first == again
    assert build_corpus(50, seed=2) != first
    checks = {
        "CN_RESIDENT_ID": v.is_cn_resident_id,
        "BANK_CARD": v.is_bank_card,
        "CN_MOBILE": v.is_cn_mobile,
        "EMAIL": v.is_email,
        "IPV4": v.is_ipv4,
        "IPV6": v.is_ipv6,
        "IBAN": v.is_iban,
        "US_SSN": v.is_us_ssn,
    }
    assert set(GENERATORS) == set(BUILTIN_TYPES)
    fold = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
    for text, gold in build_corpus(500, seed=5):
        for entity_type, start, end in gold:
            assert checks[entity_type](text[start:end].translate(fold)), text[start:end]


def test_corpus_precision_and_recall_per_type() -> None:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for text, gold in build_corpus(2000, seed=7):
        predicted = {(f.entity_type, f.start, f.end) for f in detect(text, ALL)}
        expected = set(gold)
        tp.update(t for t, _, _ in predicted & expected)
        fp.update(t for t, _, _ in predicted - expected)
        fn.update(t for t, _, _ in expected - predicted)
    for entity_type in BUILTIN_TYPES:
        assert tp[entity_type] >= 100, entity_type
        precision = tp[entity_type] / (tp[entity_type] + fp[entity_type])
        recall = tp[entity_type] / (tp[entity_type] + fn[entity_type])
        assert precision >= 0.99, (entity_type, precision)
        assert recall >= 0.99, (entity_type, recall)
