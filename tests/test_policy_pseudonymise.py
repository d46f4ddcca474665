"""Pseudonymisation: placeholders, restore, streaming restore across split chunks, and the
encrypted, expiring mapping store."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from sovra.detectors import Finding, builtin_detectors, detect
from sovra.policy import MappingStore, MappingStoreError, Pseudonymiser, PseudonymiserFull

RESIDENT_ID = "11010519491231002X"
OTHER_ID = "440304198506120035"
MOBILE = "13812345678"
EMAIL = "li.wei@example.com"

MIXED = (
    f"患者身份证号{RESIDENT_ID}，电话{MOBILE}。Please e-mail {EMAIL} the results; "
    f"家属身份证{OTHER_ID}，复诊时再次核对{RESIDENT_ID}。"
)


def findings(text: str) -> list[Finding]:
    return detect(text, builtin_detectors())


def test_round_trip_mixed_chinese_english() -> None:
    conversation = Pseudonymiser()
    out = conversation.pseudonymise(MIXED, findings(MIXED))
    for value in (RESIDENT_ID, OTHER_ID, MOBILE, EMAIL):
        assert value not in out
    assert out == (
        "患者身份证号<CN_RESIDENT_ID_1>，电话<CN_MOBILE_1>。Please e-mail <EMAIL_1> the results; "
        "家属身份证<CN_RESIDENT_ID_2>，复诊时再次核对<CN_RESIDENT_ID_1>。"
    )
    assert conversation.restore(out) == MIXED
    assert len(conversation) == 4


def test_consistent_across_turns_of_a_conversation() -> None:
    conversation = Pseudonymiser()
    first = conversation.pseudonymise(f"ID {OTHER_ID}", findings(f"ID {OTHER_ID}"))
    second_text = f"again {OTHER_ID} and {RESIDENT_ID}"
    second = conversation.pseudonymise(second_text, findings(second_text))
    assert first == "ID <CN_RESIDENT_ID_1>"
    assert second == "again <CN_RESIDENT_ID_1> and <CN_RESIDENT_ID_2>"
    # a new conversation starts its own numbering
    assert (
        Pseudonymiser()
        .pseudonymise(second_text, findings(second_text))
        .endswith("<CN_RESIDENT_ID_1> and <CN_RESIDENT_ID_2>")
    )


def test_restore_leaves_unknown_and_malformed_placeholders() -> None:
    conversation = Pseudonymiser()
    conversation.pseudonymise(EMAIL, findings(EMAIL))
    text = "<EMAIL_1> <EMAIL_2> <email_1> <EMAIL_1 <EMAIL_01> a<b> x < y"
    assert (
        conversation.restore(text) == f"{EMAIL} <EMAIL_2> <email_1> <EMAIL_1 <EMAIL_01> a<b> x < y"
    )


def test_findings_must_match_the_text_and_errors_do_not_leak() -> None:
    conversation = Pseudonymiser()
    with pytest.raises(ValueError) as info:
        conversation.pseudonymise("abc", [Finding("EMAIL", 0, 3, EMAIL)])
    assert EMAIL not in str(info.value)
    with pytest.raises(ValueError):
        conversation.pseudonymise("abcdef", [Finding("X", 0, 3, "abc"), Finding("X", 2, 4, "cd")])
    with pytest.raises(ValueError):
        conversation.pseudonymise("abc", [Finding("X", 2, 9, "c")])
    conversation.pseudonymise(MIXED, findings(MIXED))
    assert RESIDENT_ID not in repr(conversation)


def test_mapping_size_is_bounded() -> None:
    conversation = Pseudonymiser(max_entries=2)
    conversation.placeholder_for("A", "1")
    conversation.placeholder_for("A", "2")
    assert conversation.placeholder_for("A", "1") == "<A_1>"
    with pytest.raises(PseudonymiserFull):
        conversation.placeholder_for("A", "3")


def _restore_chunks(conversation: Pseudonymiser, chunks: list[str]) -> str:
    restorer = conversation.stream()
    out = [restorer.feed(chunk) for chunk in chunks]
    out.append(restorer.close())
    return "".join(out)


def test_stream_restore_every_two_way_split() -> None:
    conversation = Pseudonymiser()
    reply = conversation.pseudonymise(MIXED, findings(MIXED))
    for cut in range(len(reply) + 1):
        assert _restore_chunks(conversation, [reply[:cut], reply[cut:]]) == MIXED, cut


def test_stream_restore_single_characters_and_random_chunks() -> None:
    conversation = Pseudonymiser()
    reply = conversation.pseudonymise(MIXED, findings(MIXED)) + " <tag> a<b <CN_RESIDENT_ID_9>"
    expected = conversation.restore(reply)
    assert _restore_chunks(conversation, list(reply)) == expected
    rng = random.Random(5)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(reply)), rng.randint(1, 12)))
        chunks = [reply[i:j] for i, j in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
        assert _restore_chunks(conversation, chunks) == expected


def test_stream_holds_back_only_possible_placeholder_prefixes() -> None:
    conversation = Pseudonymiser()
    conversation.pseudonymise(EMAIL, findings(EMAIL))
    restorer = conversation.stream()
    assert restorer.feed("你好 <EMA") == "你好 "
    assert restorer.feed("IL_1> and <b>") == f"{EMAIL} and <b>"
    assert restorer.feed("x <") == "x "
    assert restorer.feed("lower") == "<lower"
    assert restorer.feed("<AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA") == "<AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    assert restorer.close() == ""
    with pytest.raises(ValueError):
        restorer.feed("more")


def test_restore_stream_generator() -> None:
    conversation = Pseudonymiser()
    reply = conversation.pseudonymise(MIXED, findings(MIXED))
    chunks = [reply[i : i + 3] for i in range(0, len(reply), 3)]
    assert "".join(conversation.restore_stream(chunks)) == MIXED


def test_export_import_round_trip() -> None:
    conversation = Pseudonymiser()
    reply = conversation.pseudonymise(MIXED, findings(MIXED))
    again = Pseudonymiser.import_mapping(conversation.export_mapping())
    assert again.restore(reply) == MIXED
    assert again.placeholder_for("CN_RESIDENT_ID", "new") == "<CN_RESIDENT_ID_3>"
    with pytest.raises(ValueError, match="not a pseudonym mapping"):
        Pseudonymiser.import_mapping(b'{"v": 1, "entries": [["A", "x", "<B_1>"]], "counters": {}}')


# --- MappingStore -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "mapping.key"
    MappingStore.generate_key(path)
    return path


def test_store_round_trip_and_expiry(tmp_path: Path, key_file: Path) -> None:
    clock = Clock()
    conversation = Pseudonymiser()
    reply = conversation.pseudonymise(MIXED, findings(MIXED))
    with MappingStore(tmp_path / "m.db", key_file, clock=clock) as store:
        expires = store.put("conv-42", conversation, ttl_s=600)
        assert expires == pytest.approx(clock.now + 600)
        loaded = store.get("conv-42")
        assert loaded is not None and loaded.restore(reply) == MIXED
        assert store.get("conv-other") is None
        clock.now += 601
        assert store.get("conv-42") is None
        assert len(store) == 0
        store.put("a", conversation, ttl_s=10)
        store.put("b", conversation, ttl_s=1000)
        clock.now += 11
        assert store.purge_expired() == 1
        assert store.delete("b") and not store.delete("b")
        with pytest.raises(ValueError):
            store.put("c", conversation, ttl_s=0)


def test_store_holds_no_plaintext(tmp_path: Path, key_file: Path) -> None:
    conversation = Pseudonymiser()
    conversation.pseudonymise(MIXED, findings(MIXED))
    db = tmp_path / "m.db"
    with MappingStore(db, key_file) as store:
        store.put("patient-conversation-7", conversation, ttl_s=60)
    raw = db.read_bytes()
    for secret in (RESIDENT_ID, MOBILE, EMAIL, "patient-conversation-7", "CN_RESIDENT_ID"):
        assert secret.encode() not in raw


def test_store_detects_tampering_and_wrong_keys(tmp_path: Path, key_file: Path) -> None:
    conversation = Pseudonymiser()
    conversation.pseudonymise(MIXED, findings(MIXED))
    db = tmp_path / "m.db"
    clock = Clock()
    with MappingStore(db, key_file, clock=clock) as store:
        store.put("c1", conversation, ttl_s=60)
    # extending the expiry in the database breaks authentication
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE mappings SET expires_ms = expires_ms + 3600000")
    with MappingStore(db, key_file, clock=clock) as store, pytest.raises(MappingStoreError):
        store.get("c1")
    other_key = tmp_path / "other.key"
    MappingStore.generate_key(other_key)
    with MappingStore(db, key_file, clock=clock) as store:
        store.put("c2", conversation, ttl_s=60)
    with MappingStore(db, other_key, clock=clock) as store:
        assert store.get("c2") is None  # row ids are keyed: another key finds nothing


def test_key_file_checks(tmp_path: Path, key_file: Path) -> None:
    with pytest.raises(MappingStoreError, match="already exists"):
        MappingStore.generate_key(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    with pytest.raises(MappingStoreError, match="chmod 600"):
        MappingStore(tmp_path / "m.db", loose)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 5)
    short.chmod(0o600)
    with pytest.raises(MappingStoreError, match="exactly 32 bytes"):
        MappingStore(tmp_path / "m.db", short)
    with pytest.raises(MappingStoreError, match="cannot read"):
        MappingStore(tmp_path / "m.db", tmp_path / "missing.key")
