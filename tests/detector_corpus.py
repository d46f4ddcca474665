"""Deterministic labelled corpus for the sensitive-value detectors (``sovra.detectors``).

``build_corpus(n, seed)`` returns ``n`` (text, gold) pairs.  Texts are short hospital / bank
snippets in Chinese, English or both, with true entities of every built-in type embedded in
them and plenty of near-misses that must *not* be reported: 18-digit numbers with a wrong
check character, IDs with impossible birth dates, Luhn-invalid card numbers, 12-digit
"mobiles", IBANs with wrong check digits, SSNs with area 000/666/9xx, IPs with a 256 octet,
version strings ``1.2.3.4.5`` and times ``12:30:45``.  Gold spans are ``(entity_type, start,
end)`` character offsets into the text.

Check digits are computed here independently of ``sovra._detector_validators`` so a bug there
cannot hide itself.  Near-misses are re-drawn until they are invalid as *every* type (e.g. a
bad-check ID that happens to be a Luhn-valid UnionPay-length number is not a near-miss).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable
from datetime import date, timedelta

Gold = list[tuple[str, int, int]]

# --- independent check-digit arithmetic --------------------------------------------------------


def _id_check(first17: str) -> str:
    weights = [2 ** (17 - i) % 11 for i in range(17)]  # 7, 9, 10, 5, 8, 4, 2, 1, 6, 3, ...
    remainder = sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11
    return "10X98765432"[remainder]


def _luhn_sum(digits: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d // 10 + d % 10
    return total


def _luhn_complete(partial: str) -> str:
    """Append the Luhn check digit."""
    return partial + str((10 - _luhn_sum(partial + "0") % 10) % 10)


def _luhn_valid(digits: str) -> bool:
    return _luhn_sum(digits) % 10 == 0


def _iban_numeric(s: str) -> int:
    return int("".join(str(int(c, 36)) for c in s))


def _iban_complete(country: str, bban: str) -> str:
    check = 98 - _iban_numeric(bban + country + "00") % 97
    return f"{country}{check:02d}{bban}"


# --- value generators ---------------------------------------------------------------------------

_REGIONS = (
    "110101", "110105", "110108", "120101", "130102", "140105", "210102", "220102", "310104",
    "310115", "320102", "320583", "330106", "340104", "350203", "360102", "370202", "410105",
    "420111", "430104", "440106", "440305", "450103", "500103", "510107", "530102", "610113",
    "620102", "650102", "710000", "810000", "820000",
)  # fmt: skip


def _rand_birth(rng: random.Random) -> date:
    return date(1930, 1, 1) + timedelta(days=rng.randrange(0, 365 * 85))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def gen_id(rng: random.Random) -> str:
    birth = _rand_birth(rng)
    body = f"{rng.choice(_REGIONS)}{birth:%Y%m%d}{_digits(rng, 3)}"
    check = _id_check(body)
    if check == "X" and rng.random() < 0.2:
        check = "x"
    return body + check


_CARD_SCHEMES = (  # (prefix, length)
    ("622202", 19), ("622848", 19), ("621700", 19), ("622588", 16), ("625", 16), ("4", 16),
    ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
    ("3528", 16), ("6011", 16), ("65", 16),
)  # fmt: skip


def _card_digits(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_SCHEMES)
    return _luhn_complete(prefix + _digits(rng, length - len(prefix) - 1))


def _format_card(rng: random.Random, digits: str) -> str:
    style = rng.random()
    if style < 0.55:
        return digits
    sep = " " if style < 0.85 else "-"
    if len(digits) == 15 and digits[:2] in ("34", "37"):
        return sep.join((digits[:4], digits[4:10], digits[10:]))
    return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def gen_card(rng: random.Random) -> str:
    return _format_card(rng, _card_digits(rng))


def gen_mobile(rng: random.Random) -> str:
    number = "1" + rng.choice("3456789") + _digits(rng, 9)
    style = rng.random()
    if style < 0.15:
        number = f"{number[:3]}-{number[3:7]}-{number[7:]}"
    elif style < 0.3:
        number = f"{number[:3]} {number[3:7]} {number[7:]}"
    prefix = rng.choice(("", "", "", "", "+86 ", "+86-", "+86", "0086 ", "86-"))
    return prefix + number


_LOCALS = (
    "zhang.wei", "li_na", "wang-fang", "liu.yang+lab", "chen_jing88", "j.smith", "mary.o-neil",
    "admin", "billing", "dr.zhao", "x.y.z", "patient_1024", "huang%ops",
)  # fmt: skip
_DOMAINS = (
    "hospital.com.cn", "xiehe-hospital.cn", "bank.com", "icbc.com.cn", "example.org",
    "mail.pku.edu.cn", "clinic.co.uk", "bücher.de", "hôpital.fr", "医院.中国", "银行.公司",
    "cmb-china.com", "163.com", "qq.com",
)  # fmt: skip


def gen_email(rng: random.Random) -> str:
    return f"{rng.choice(_LOCALS)}@{rng.choice(_DOMAINS)}"


def gen_ipv4(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        octets = [10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)]
    elif kind < 0.6:
        octets = [192, 168, rng.randrange(256), rng.randrange(1, 255)]
    else:
        octets = [rng.randrange(1, 224)] + [rng.randrange(256) for _ in range(3)]
    return ".".join(map(str, octets))


def gen_ipv6(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return f"::ffff:{gen_ipv4(rng)}"
    if kind < 0.3:
        return f"fe80::{rng.randrange(1, 0xFFFF):x}:{rng.randrange(0x10000):x}"
    groups = [rng.randrange(0x10000) for _ in range(8)]
    groups[0] = rng.choice((0x2001, 0x2408, 0x240E, 0xFD00, rng.randrange(0x2000, 0x3FFF)))
    if rng.random() < 0.6:  # a run of zero groups, so the compressed form uses "::"
        i = rng.randrange(1, 7)
        for j in range(i, min(8, i + rng.randrange(2, 5))):
            groups[j] = 0
    address = ipaddress.IPv6Address(sum(g << (16 * (7 - k)) for k, g in enumerate(groups)))
    text = address.exploded if rng.random() < 0.2 else address.compressed
    return text.upper() if rng.random() < 0.1 else text


def _alnum(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(n))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))


_BBAN: dict[str, Callable[[random.Random], str]] = {
    "DE": lambda r: _digits(r, 18),
    "GB": lambda r: _letters(r, 4) + _digits(r, 14),
    "FR": lambda r: _digits(r, 10) + _alnum(r, 11) + _digits(r, 2),
    "NL": lambda r: _letters(r, 4) + _digits(r, 10),
    "CH": lambda r: _digits(r, 5) + _alnum(r, 12),
    "ES": lambda r: _digits(r, 20),
    "IT": lambda r: _letters(r, 1) + _digits(r, 10) + _alnum(r, 12),
    "BE": lambda r: _digits(r, 12),
}


def _group4(compact: str) -> str:
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def _iban_compact(rng: random.Random) -> str:
    country = rng.choice(sorted(_BBAN))
    return _iban_complete(country, _BBAN[country](rng))


def gen_iban(rng: random.Random) -> str:
    compact = _iban_compact(rng)
    return _group4(compact) if rng.random() < 0.5 else compact


def gen_ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    sep = "-" if rng.random() < 0.8 else " "
    return f"{area:03d}{sep}{rng.randrange(1, 100):02d}{sep}{rng.randrange(1, 10000):04d}"


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "CN_RESIDENT_ID": gen_id,
    "BANK_CARD": gen_card,
    "CN_MOBILE": gen_mobile,
    "EMAIL": gen_email,
    "IPV4": gen_ipv4,
    "IPV6": gen_ipv6,
    "IBAN": gen_iban,
    "US_SSN": gen_ssn,
}

# --- near-miss generators (all must be rejected by every detector) ------------------------------


def _card_like(digits: str) -> bool:
    """Could ``digits`` pass as a payment card?  (Conservative: any 13-19 Luhn-valid number.)"""
    return digits.isdigit() and 13 <= len(digits) <= 19 and _luhn_valid(digits)


def nm_id_bad_check(rng: random.Random) -> str:
    while True:
        good = gen_id(rng)
        wrong = rng.choice([c for c in "0123456789X" if c != good[17].upper()])
        bad = good[:17] + wrong
        if not _card_like(bad):
            return bad


def nm_id_bad_date(rng: random.Random) -> str:
    while True:
        year = rng.randrange(1940, 2010)
        month_day = rng.choice(("0230", "0231", "0431", "0631", "0931", "1131", "0229"))
        if month_day == "0229" and year % 4 == 0:
            year += 1  # 29 February only in non-leap years
        body = f"{rng.choice(_REGIONS)}{year}{month_day}{_digits(rng, 3)}"
        candidate = body + _id_check(body)
        if not _card_like(candidate):
            return candidate


def nm_id_future(rng: random.Random) -> str:
    while True:
        born = date.today() + timedelta(days=rng.randrange(400, 3000))
        body = f"{rng.choice(_REGIONS)}{born:%Y%m%d}{_digits(rng, 3)}"
        candidate = body + _id_check(body)
        if not _card_like(candidate):
            return candidate


def nm_card_bad_luhn(rng: random.Random) -> str:
    digits = _card_digits(rng)
    wrong = rng.choice([d for d in "0123456789" if d != digits[-1]])
    return _format_card(rng, digits[:-1] + wrong)


def nm_mobile_12(rng: random.Random) -> str:
    return "1" + rng.choice("3456789") + _digits(rng, 10)


def nm_mobile_10(rng: random.Random) -> str:
    return "1" + rng.choice("3456789") + _digits(rng, 8)


def nm_iban_bad_check(rng: random.Random) -> str:
    compact = _iban_compact(rng)
    good = int(compact[2:4])
    # Check digits d and d +/- 97 are equivalent mod 97: avoid 0/1/2 <-> 97/98/99.
    wrong = rng.choice([c for c in range(3, 97) if c != good])
    bad = f"{compact[:2]}{wrong:02d}{compact[4:]}"
    return _group4(bad) if rng.random() < 0.5 else bad


def nm_ssn_bad(rng: random.Random) -> str:
    area = rng.choice(("000", "666", f"{rng.randrange(900, 1000)}", "123", "078"))
    group = f"{rng.randrange(1, 100):02d}"
    serial = f"{rng.randrange(1, 10000):04d}"
    if area in ("123", "078"):  # valid area: break the group or the serial instead
        if rng.random() < 0.5:
            group = "00"
        else:
            serial = "0000"
    return f"{area}-{group}-{serial}"


def nm_ip_256(rng: random.Random) -> str:
    octets = [str(rng.randrange(1, 255)) for _ in range(4)]
    octets[rng.randrange(4)] = str(rng.randrange(256, 300))
    return ".".join(octets)


def nm_version(rng: random.Random) -> str:
    parts = [str(rng.randrange(0, 20)) for _ in range(rng.choice((5, 5, 6)))]
    return rng.choice(("", "v")) + ".".join(parts)


def nm_time(rng: random.Random) -> str:
    return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"


def nm_long_digits(rng: random.Random) -> str:
    """A 20-24 digit reference number (contains 18-digit and 16-digit windows)."""
    return rng.choice("123456789") + _digits(rng, rng.randrange(19, 24))


NEAR_MISSES: dict[str, Callable[[random.Random], str]] = {
    "nm_id_check": nm_id_bad_check,
    "nm_id_date": nm_id_bad_date,
    "nm_id_future": nm_id_future,
    "nm_card": nm_card_bad_luhn,
    "nm_mobile12": nm_mobile_12,
    "nm_mobile10": nm_mobile_10,
    "nm_iban": nm_iban_bad_check,
    "nm_ssn": nm_ssn_bad,
    "nm_ip": nm_ip_256,
    "nm_version": nm_version,
    "nm_time": nm_time,
    "nm_long": nm_long_digits,
}

# --- harmless fillers ---------------------------------------------------------------------------

_CN_NAMES = ("张伟", "王芳", "李娜", "刘洋", "陈静", "杨磊", "赵敏", "黄晓明", "周杰", "吴雪")
_EN_NAMES = ("John Smith", "Mary Johnson", "Wei Zhang", "Anna Müller", "Pierre Martin", "Li Na")
_DEPTS = ("心内科", "呼吸科", "急诊科", "肿瘤科", "儿科", "放射科", "信用卡中心", "个人金融部")


def _amount(rng: random.Random) -> str:
    value = rng.randrange(1, 10_000_000) / 100
    return rng.choice(("¥{:,.2f}", "{:.2f}元", "${:,.2f}", "EUR {:,.2f}")).format(value)


def _date(rng: random.Random) -> str:
    d = date(2015, 1, 1) + timedelta(days=rng.randrange(0, 3650))
    return rng.choice(("{:%Y-%m-%d}", "{:%Y年%m月%d日}", "{:%d/%m/%Y}")).format(d)


FILLERS: dict[str, Callable[[random.Random], str]] = {
    "cn_name": lambda r: r.choice(_CN_NAMES),
    "en_name": lambda r: r.choice(_EN_NAMES),
    "dept": lambda r: r.choice(_DEPTS),
    "amount": _amount,
    "date": _date,
    "clock": lambda r: f"{r.randrange(24):02d}:{r.randrange(60):02d}",
    "mrn": lambda r: f"MRN-{r.randrange(2015, 2025)}-{r.randrange(10**6):06d}",
    "bed": lambda r: f"{r.randrange(1, 30)}床",
    "bp": lambda r: f"{r.randrange(90, 160)}/{r.randrange(55, 100)}",
    "tail4": lambda r: _digits(r, 4),
    "order": lambda r: f"2{r.randrange(10**13, 10**14)}",  # 15 digits, not a card prefix
    "emoji": lambda r: r.choice(("😀", "🏥", "💳", "✅", "⚠️", "")),
    "ver": lambda r: f"{r.randrange(1, 9)}.{r.randrange(20)}.{r.randrange(20)}",
    "dose": lambda r: f"{r.choice((25, 50, 100, 300))}mg",
    "size": lambda r: f"{r.randrange(3, 30) / 10}cm×{r.randrange(3, 30) / 10}cm",
    "months": lambda r: str(r.randrange(1, 13)),
    "hours": lambda r: str(r.randrange(1, 7)),
    "age": lambda r: str(r.randrange(18, 95)),
    "pct": lambda r: f"{r.randrange(1, 100) / 10}%",
    "wbc": lambda r: f"{r.randrange(30, 200) / 10}",
}

# --- templates ----------------------------------------------------------------------------------

_TEMPLATES = (
    "患者{cn_name}，身份证号{CN_RESIDENT_ID}，联系电话{CN_MOBILE}，于{date}入住{dept}{bed}。",
    "身份证{CN_RESIDENT_ID}，电话{CN_MOBILE}",
    "病历号{mrn}，患者{cn_name}（身份证：{CN_RESIDENT_ID}）血压{bp}mmHg，{clock}复查{emoji}。",
    "请将报告发送至{EMAIL}，或致电{CN_MOBILE}联系{dept}。",
    "客户{cn_name}的借记卡{BANK_CARD}于{date} {clock}消费{amount}，尾号{tail4}。",
    "银行卡号：{BANK_CARD}；开户人身份证号：{CN_RESIDENT_ID}。",
    "Card {BANK_CARD} was charged {amount} on {date}; contact {EMAIL}.",
    "Patient {en_name}, SSN {US_SSN}, phone {CN_MOBILE}, email {EMAIL}.",
    "Wire {amount} to IBAN {IBAN} (ref {order}) before {date}.",
    "收款账户IBAN：{IBAN}，金额{amount}，订单号{order}。",
    "Server {IPV4} ({IPV6}) logged the access at {nm_time} {emoji}",
    "HIS服务器{IPV4}与影像系统{IPV6}同步失败，版本{nm_version}，时间{nm_time}。",
    "登录IP：{IPV4}，设备IPv6：{IPV6}，版本号{ver}。",
    "SSN: {US_SSN}; MRN {mrn}; insurer contact {EMAIL}",
    "患者{cn_name}的社保卡{BANK_CARD}，手机{CN_MOBILE}，邮箱{EMAIL}。",
    # near-miss heavy templates
    "原始编号{nm_id_check}疑似身份证但校验位错误，备注{nm_id_date}。",
    "出生日期异常的号码{nm_id_date}，另有{nm_id_future}，请核对。",
    "卡号{nm_card}校验失败（Luhn），订单{order}。",
    "号码{nm_mobile12}不是手机号，{nm_mobile10}也不是。",
    "Invalid IBAN {nm_iban} rejected at {nm_time}.",
    "Test SSN {nm_ssn} is not issued; neither is {nm_ssn}.",
    "Bad address {nm_ip} and build {nm_version} at {nm_time}.",
    "参考号{nm_long}，流水{order}，时间{nm_time}，版本{nm_version}。",
    "Reference {nm_long} / {nm_card} / {nm_iban}",
    # mixed positives and near-misses
    "身份证{CN_RESIDENT_ID}（旧号{nm_id_check}作废），新卡{BANK_CARD}，旧卡{nm_card}。",
    "IP {IPV4} ok, {nm_ip} invalid, IPv6 {IPV6} ok, time {nm_time}.",
    "IBAN {IBAN} valid; IBAN {nm_iban} invalid. SSN {US_SSN} valid; {nm_ssn} invalid.",
    "联系人{cn_name}：{CN_MOBILE}、{nm_mobile12}（错误），{EMAIL}",
)

# Sentences with no sensitive value: most of a real note or chat transcript looks like this.
_PROSE = (
    "患者主诉胸闷气短三天，活动后加重，伴有咳嗽、咳白色黏痰，无发热及咯血。",
    "查体：神志清，精神可，双肺呼吸音粗，未闻及明显干湿啰音，心律齐。",
    "给予阿司匹林{dose}口服，每日一次，并嘱低盐低脂饮食，监测血压、心率变化。",
    "胸部CT示右肺下叶见一结节影，大小约{size}，边界清楚，建议{months}个月后复查。",
    "{dept}会诊意见：考虑社区获得性肺炎，继续抗感染治疗，必要时完善支气管镜检查。",
    "今日{clock}查房，患者一般情况可，饮食睡眠尚可，大小便正常，血压{bp}mmHg。",
    "MDT讨论认为该患者适合行PCI治疗，follow-up in {months} months，家属表示理解并签字。",
    "The patient was admitted with community-acquired pneumonia and started on IV ceftriaxone.",
    "Please review the attached discharge summary and confirm the follow-up appointment.",
    "Lab results: WBC {wbc} x10^9/L, CRP elevated, procalcitonin within normal limits.",
    "客户来电咨询信用卡分期业务，已告知分期手续费率为每期{pct}，客户表示理解。",
    "本行将于{date}凌晨对网上银行系统进行升级维护，届时转账汇款等服务将暂停约{hours}小时。",
    "经核实，该笔交易为客户本人操作，资金已于{date}退回原账户，金额{amount}。",
    "根据反洗钱相关规定，请客户补充提供收入证明及资金来源说明材料。",
    "The customer disputes a card-not-present payment of {amount}; chargeback opened {date}.",
    "Our Q3 risk review found no material exposure; the model (v{ver}) was re-validated.",
    "风控模型{ver}版本上线后，误报率下降约{pct}，审批时效提升明显。",
    "Reminder: the compliance training deadline is {date}. 请各部门负责人督促完成。",
    "系统日志显示{clock}出现连接超时，已重启服务，目前运行正常{emoji}",
    "患者{cn_name}，{age}岁，因“反复上腹痛{months}月”入院，既往体健，否认药物过敏史。",
)

_SLOT = re.compile(r"\{(\w+)\}")
_FULLWIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)})


def _render(rng: random.Random, template: str, text: list[str], gold: Gold, pos: int) -> int:
    pieces = _SLOT.split(template)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            text.append(piece)
            pos += len(piece)
            continue
        if piece in GENERATORS:
            value = GENERATORS[piece](rng)
            if piece == "CN_MOBILE" and rng.random() < 0.05 and template[0] > "\u3000":
                value = value.translate(_FULLWIDTH)  # full-width digits typed with a CJK IME
            gold.append((piece, pos, pos + len(value)))
        elif piece in NEAR_MISSES:
            value = NEAR_MISSES[piece](rng)
        else:
            value = FILLERS[piece](rng)
        text.append(value)
        pos += len(value)
    return pos


def build_corpus(
    n: int, seed: int, prose: float = 0.5
) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """``n`` labelled samples of 1-4 sentences each; deterministic for a given ``seed``.

    ``prose`` is the share of sentences without any sensitive value (realistic notes are
    mostly prose; 0.0 gives a dense corpus of entities and near-misses only).
    """
    rng = random.Random(seed)
    corpus: list[tuple[str, Gold]] = []
    for _ in range(n):
        text: list[str] = []
        gold: Gold = []
        pos = 0
        for k in range(rng.randrange(1, 5)):
            template = rng.choice(_PROSE if rng.random() < prose else _TEMPLATES)
            sentence: list[str] = []
            spans: Gold = []
            _render(rng, template, sentence, spans, 0)
            body = "".join(sentence)
            if k:
                sep = rng.choice((" ", "", "\n"))
                last, first = text[-1][-1], body[0]
                if not sep and (last.isalnum() or last == ".") and first.isascii():
                    sep = " "  # do not glue a trailing value to the next sentence's first word
                text.append(sep)
                pos += len(sep)
            gold.extend((etype, pos + start, pos + end) for etype, start, end in spans)
            text.append(body)
            pos += len(body)
        corpus.append(("".join(text), gold))
    return corpus


def corpus_text(min_bytes: int, seed: int = 11, prose: float = 0.5) -> str:
    """At least ``min_bytes`` (UTF-8) of corpus text, samples separated by newlines."""
    parts: list[str] = []
    size = 0
    batch = 0
    while size < min_bytes:
        for text, _ in build_corpus(500, seed + batch, prose):
            parts.append(text)
            size += len(text.encode()) + 1
        batch += 1
    return "\n".join(parts)
