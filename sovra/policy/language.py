"""The policy language: its data model, loading a directory of YAML files, and validation.

A policy is a directory of ``*.yaml`` (or ``*.yml``) files, loaded recursively in sorted order of
their relative paths.  Each file is one YAML mapping holding any of the top-level sections
``classes``, ``detectors``, ``applications``, ``purposes``, ``destinations``, ``rules``,
``tests`` and ``training_columns``; list sections are concatenated in file order, mapping sections
are merged (a name may be defined only once), ``classes`` may be defined in one file only.
``docs/policy.md`` is the reference.

Every problem found is reported as a :class:`PolicyProblem` naming the file, the 1-based line
and the path inside the document (``rules[2].match.max_class``); :class:`PolicyInvalid` carries
all of them.  Problem messages quote names from the policy (classes, rule ids, keys) but never
the text of test cases.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from sovra.detectors import BUILTIN_TYPES, VALIDATORS

__all__ = [
    "ATTESTATION_LEVELS",
    "COLUMN_ACTIONS",
    "EFFECT_PRECEDENCE",
    "Application",
    "Destination",
    "DetectorSpec",
    "Effect",
    "Expectation",
    "Match",
    "Obligations",
    "PolicyError",
    "PolicyInvalid",
    "PolicyProblem",
    "PolicySpec",
    "PolicyTestCase",
    "Rule",
    "Source",
    "directory_digest",
    "load_spec",
    "parse_policy",
    "read_policy_dir",
]

#: Limits that keep loading bounded whatever the directory holds.
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 16 << 20
MAX_FILES = 1000
MAX_NODES_PER_FILE = 200_000  # counts alias expansions, so "billion laughs" documents stop early
MAX_DEPTH = 32
POLICY_SUFFIXES = (".yaml", ".yml")


class Effect(StrEnum):
    """What happens to a request."""

    ALLOW = "allow"
    PSEUDONYMISE = "pseudonymise"
    DENY = "deny"
    KEEP_LOCAL = "keep-local"


#: Strongest first: when several rules match, the first effect in this order that any of them
#: has wins (deny > keep-local > pseudonymise > allow).
EFFECT_PRECEDENCE: tuple[Effect, ...] = (
    Effect.DENY,
    Effect.KEEP_LOCAL,
    Effect.PSEUDONYMISE,
    Effect.ALLOW,
)

#: Accepted ``min_attestation`` values, strictest first (EAR-style appraisal tiers).
ATTESTATION_LEVELS: tuple[str, ...] = ("affirming", "warning")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_ENTITY_TYPE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_RETENTION = re.compile(
    r"none|P(?!$)(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+W)?(?:[0-9]+D)?"
    r"(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+S)?)?"
)
_DEFAULT_PSEUDONYMISE_FROM = "confidential"


# --- problems ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong with a policy: where (file, 1-based line, document path) and what."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


class PolicyError(Exception):
    """Base class of the policy package's errors."""


class PolicyInvalid(PolicyError):
    """The policy does not load; ``problems`` lists every problem found."""

    def __init__(self, problems: Iterable[PolicyProblem]) -> None:
        self.problems: tuple[PolicyProblem, ...] = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        count = len(self.problems)
        lines = "".join(f"\n  {p}" for p in self.problems)
        return f"policy invalid: {count} problem{'s' if count != 1 else ''}{lines}"


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where an item was defined."""

    file: str
    line: int | None
    path: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """An enabled detector and the data class of what it finds."""

    entity_type: str
    data_class: str
    kind: Literal["builtin", "regex", "keywords"]
    pattern: str | None = None
    validator: str | None = None
    keywords: tuple[str, ...] = field(default=(), repr=False)
    case_sensitive: bool = False
    source: Source | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Application:
    name: str
    description: str
    purposes: tuple[str, ...]
    source: Source | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where requests may be sent: jurisdictions, regions, TEE types, pools, models served."""

    name: str
    jurisdictions: tuple[str, ...]
    regions: tuple[str, ...] = ()
    tee_types: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    source: Source | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "jurisdictions": list(self.jurisdictions),
            "regions": list(self.regions),
            "tee_types": list(self.tee_types),
            "pools": list(self.pools),
            "models": list(self.models),
        }


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions of a rule; ``None`` means "any".  All given conditions must hold."""

    applications: tuple[str, ...] | None = None
    purposes: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    classes_present: tuple[str, ...] | None = None  # any of these classes is present
    max_class: str | None = None  # nothing more sensitive than this class is present

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("applications", "purposes", "models", "classes_present"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value)
        if self.max_class is not None:
            out["max_class"] = self.max_class
        return out


@dataclass(frozen=True, slots=True)
class Obligations:
    """Constraints that travel with a request that may leave (sealed into its header)."""

    allowed_jurisdictions: tuple[str, ...] = ()
    accepted_tee_types: tuple[str, ...] = ()
    min_attestation: str = "affirming"
    retention: str = "none"
    pseudonymise_classes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed_jurisdictions": list(self.allowed_jurisdictions),
            "accepted_tee_types": list(self.accepted_tee_types),
            "min_attestation": self.min_attestation,
            "retention": self.retention,
            "pseudonymise_classes": list(self.pseudonymise_classes),
        }


NO_OBLIGATIONS = Obligations()


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule.  ``obligations`` are effective values (destination defaults filled in)."""

    id: str
    effect: Effect
    match: Match
    destination: str | None = None
    obligations: Obligations = NO_OBLIGATIONS
    description: str = ""
    source: Source | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Expectation:
    effect: Effect
    rule: str | None = None
    check_rule: bool = False  # ``rule:`` given (``rule: null`` expects the default deny)
    entities: Mapping[str, int] | None = None  # exact entity counts, when given


@dataclass(frozen=True, slots=True)
class PolicyTestCase:
    """A test shipped with the policy.  ``text`` is sample data: never log it."""

    name: str
    app: str
    purpose: str
    model: str
    text: str = field(repr=False)
    expect: Expectation
    labels: tuple[str, ...] = ()
    source: Source | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A validated policy, as written (the engine compiles it)."""

    classes: tuple[str, ...]
    detectors: tuple[DetectorSpec, ...]
    applications: Mapping[str, Application]
    purposes: tuple[str, ...]
    destinations: Mapping[str, Destination]
    rules: tuple[Rule, ...]
    tests: tuple[PolicyTestCase, ...]
    files: tuple[str, ...]
    digest: str  # "dir:<sha256>" over the files' names and contents
    #: Purpose training: what happens to dataset columns of each class before a decision
    #: (``keep`` | ``pseudonymise`` | ``drop``); classes not named are kept (docs/policy.md).
    training_columns: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


# --- reading files ----------------------------------------------------------------------------


def read_policy_dir(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """All policy files under ``directory`` (relative POSIX path -> bytes), sorted by path.

    Hidden files and directories (``.git``, ``..data``) are skipped and symlinked directories
    are not followed; symlinked files are read.  Raises :class:`PolicyInvalid` when the
    directory cannot be read, holds no policy files, or exceeds the size limits.
    """
    root = Path(directory)
    label = str(directory)
    if not root.is_dir():
        raise PolicyInvalid([PolicyProblem(label, None, "", "not a directory")])
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.endswith(POLICY_SUFFIXES):
                names.append(Path(dirpath, name).relative_to(root).as_posix())
    names.sort()
    if not names:
        raise PolicyInvalid([PolicyProblem(label, None, "", "no *.yaml policy files found")])
    if len(names) > MAX_FILES:
        raise PolicyInvalid(
            [PolicyProblem(label, None, "", f"{len(names)} policy files; the limit is {MAX_FILES}")]
        )
    files: dict[str, bytes] = {}
    problems: list[PolicyProblem] = []
    total = 0
    for name in names:
        path = root / name
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                problems.append(
                    PolicyProblem(name, None, "", f"file is {size} bytes; limit {MAX_FILE_BYTES}")
                )
                continue
            with path.open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            problems.append(PolicyProblem(name, None, "", f"cannot read: {exc.strerror}"))
            continue
        if len(data) > MAX_FILE_BYTES:
            problems.append(PolicyProblem(name, None, "", f"file exceeds {MAX_FILE_BYTES} bytes"))
            continue
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            problems.append(
                PolicyProblem(label, None, "", f"policy files exceed {MAX_TOTAL_BYTES} bytes")
            )
            break
        files[name] = data
    if problems:
        raise PolicyInvalid(problems)
    return files


def directory_digest(files: Mapping[str, bytes]) -> str:
    """``dir:<sha256>`` over the sorted file names and contents (the id of an unsigned policy)."""
    digest = hashlib.sha256(b"sovra-policy-dir-v1\0")
    for name in sorted(files):
        data = files[name]
        digest.update(name.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
        digest.update(data)
    return "dir:" + digest.hexdigest()


# --- YAML with positions ----------------------------------------------------------------------

PathT = tuple[str | int, ...]


def format_path(path: PathT) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class _File:
    """One parsed file: its data plus the line of every key and value by document path."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key_lines: dict[PathT, int] = {}
        self.value_lines: dict[PathT, int] = {}

    def line(self, path: PathT, *, key: bool = False) -> int | None:
        if key and path in self.key_lines:
            return self.key_lines[path]
        probe = path
        while True:
            if probe in self.value_lines:
                return self.value_lines[probe]
            if not probe:
                return None
            probe = probe[:-1]


@dataclass(frozen=True, slots=True)
class _Loc:
    file: _File
    path: PathT

    def sub(self, *parts: str | int) -> _Loc:
        return _Loc(self.file, self.path + parts)

    def source(self) -> Source:
        return Source(self.file.name, self.file.line(self.path), format_path(self.path))

    def where(self) -> str:
        line = self.file.line(self.path)
        return f"{self.file.name}:{line}" if line is not None else self.file.name


class _Problems:
    def __init__(self) -> None:
        self.items: list[PolicyProblem] = []

    def add(self, loc: _Loc, message: str, *, key: bool = False) -> None:
        self.items.append(
            PolicyProblem(
                loc.file.name, loc.file.line(loc.path, key=key), format_path(loc.path), message
            )
        )

    def file(self, name: str, message: str, line: int | None = None) -> None:
        self.items.append(PolicyProblem(name, line, "", message))


class _TooBig(Exception):
    pass


class _Walker:
    """Turns a composed YAML node tree into plain data, recording positions."""

    def __init__(self, loader: yaml.SafeLoader, file: _File, problems: _Problems) -> None:
        self.loader = loader
        self.file = file
        self.problems = problems
        self.nodes = 0

    def walk(self, node: yaml.Node, path: PathT) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES_PER_FILE:
            raise _TooBig(f"document has more than {MAX_NODES_PER_FILE} nodes (alias expansion?)")
        if len(path) > MAX_DEPTH:
            raise _TooBig(f"document nests deeper than {MAX_DEPTH} levels")
        self.file.value_lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = (
                    self.loader.construct_object(key_node)
                    if isinstance(key_node, yaml.ScalarNode)
                    else None
                )
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    self.problems.items.append(
                        PolicyProblem(
                            self.file.name,
                            line,
                            format_path(path),
                            _wrong_type("a string key", key),
                        )
                    )
                    continue
                sub = (*path, key)
                if key in result:
                    self.problems.items.append(
                        PolicyProblem(
                            self.file.name, line, format_path(sub), f"duplicate key {key!r}"
                        )
                    )
                    continue
                self.file.key_lines[sub] = line
                result[key] = self.walk(value_node, sub)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node)


def _parse_yaml(name: str, data: bytes, problems: _Problems) -> tuple[_File, Any] | None:
    if b"\0" in data:
        problems.file(name, "contains NUL bytes; not a text file")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.file(name, f"not valid UTF-8 (byte offset {exc.start})")
        return None
    file = _File(name)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return file, None
        return file, _Walker(loader, file, problems).walk(node, ())
    except yaml.MarkedYAMLError as exc:
        # Only the parser's own words: its context snippet would quote the document.
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        problems.file(
            name, f"YAML syntax error: {what or 'unparseable'}", mark.line + 1 if mark else None
        )
    except yaml.YAMLError as exc:
        problems.file(name, f"YAML error: {type(exc).__name__}")
    except _TooBig as exc:
        problems.file(name, str(exc))
    except RecursionError:
        problems.file(name, "document nests too deeply")
    finally:
        loader.dispose()
    return None


# --- typed field readers ----------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, datetime | date):
        return "date"
    return type(value).__name__


def _wrong_type(expected: str, value: object) -> str:
    message = f"expected {expected}, got {_type_name(value)}"
    if isinstance(value, bool):
        message += " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote it)"
    elif isinstance(value, int | float | datetime | date):
        message += " (quote it to make it a string)"
    return message


class _Reader:
    def __init__(self, problems: _Problems) -> None:
        self.p = problems

    def mapping(
        self,
        loc: _Loc,
        value: Any,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.p.add(loc, _wrong_type("a mapping", value))
            return None
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self.p.add(
                    loc.sub(key),
                    f"unknown key {key!r}{suggestion} (expected: {', '.join(allowed)})",
                    key=True,
                )
        for key in required:
            if key not in value:
                self.p.add(loc, f"missing required key {key!r}")
        return value

    def string(
        self, loc: _Loc, value: Any, pattern: re.Pattern[str] | None = None, what: str = "name"
    ) -> str | None:
        if not isinstance(value, str):
            self.p.add(loc, _wrong_type("a string", value))
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.p.add(loc, f"invalid {what} {value!r} (must match {pattern.pattern})")
            return None
        return value

    def text(self, loc: _Loc, value: Any) -> str | None:
        if not isinstance(value, str):
            self.p.add(loc, _wrong_type("a string", value))
            return None
        return value

    def string_list(
        self,
        loc: _Loc,
        value: Any,
        pattern: re.Pattern[str] | None = None,
        what: str = "name",
        *,
        non_empty: bool = True,
    ) -> tuple[str, ...] | None:
        if not isinstance(value, list):
            self.p.add(loc, _wrong_type("a list of strings", value))
            return None
        if non_empty and not value:
            self.p.add(loc, "must not be empty (omit the key instead)")
            return None
        out: list[str] = []
        ok = True
        for i, item in enumerate(value):
            s = self.string(loc.sub(i), item, pattern, what)
            if s is None:
                ok = False
            elif s in out:
                self.p.add(loc.sub(i), f"duplicate entry {s!r}")
                ok = False
            else:
                out.append(s)
        return tuple(out) if ok else None

    def refs(
        self, loc: _Loc, names: tuple[str, ...] | None, known: Iterable[str], kind: str
    ) -> tuple[str, ...] | None:
        """Check that every name is defined; report each undefined one at its list index."""
        if names is None:
            return None
        known_list = list(known)
        ok = True
        for i, name in enumerate(names):
            if name not in known_list:
                self.undefined(loc.sub(i), name, known_list, kind)
                ok = False
        return names if ok else None

    def undefined(self, loc: _Loc, name: str, known: Sequence[str], kind: str) -> None:
        hint = difflib.get_close_matches(name, known, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        defined = ", ".join(known) if known else "none defined"
        self.p.add(loc, f"undefined {kind} {name!r}{suggestion} (defined: {defined})")


# --- parsing ----------------------------------------------------------------------------------

_TOP_KEYS = (
    "classes",
    "detectors",
    "applications",
    "purposes",
    "destinations",
    "rules",
    "tests",
    "training_columns",
)
_DETECTOR_KEYS = ("builtin", "name", "regex", "keywords", "validator", "case_sensitive", "class")
_APPLICATION_KEYS = ("description", "purposes")
_DESTINATION_KEYS = ("jurisdictions", "regions", "tee_types", "pools", "models")
_RULE_KEYS = ("id", "description", "match", "effect", "destination", "obligations")
_MATCH_KEYS = ("applications", "purposes", "models", "classes_present", "max_class")
_OBLIGATION_KEYS = (
    "allowed_jurisdictions",
    "accepted_tee_types",
    "min_attestation",
    "retention",
    "pseudonymise_classes",
)
#: What ``training_columns`` may do with the dataset columns of a class (purpose training).
COLUMN_ACTIONS: tuple[str, ...] = ("keep", "pseudonymise", "drop")
_TEST_KEYS = ("name", "app", "purpose", "model", "text", "labels", "expect")
_EXPECT_KEYS = ("effect", "rule", "entities")
_EFFECTS = tuple(e.value for e in Effect)


@dataclass
class _Sections:
    classes: list[tuple[_Loc, Any]] = field(default_factory=list)
    detectors: list[tuple[_Loc, Any]] = field(default_factory=list)
    applications: list[tuple[_Loc, Any]] = field(default_factory=list)
    purposes: list[tuple[_Loc, Any]] = field(default_factory=list)
    destinations: list[tuple[_Loc, Any]] = field(default_factory=list)
    rules: list[tuple[_Loc, Any]] = field(default_factory=list)
    tests: list[tuple[_Loc, Any]] = field(default_factory=list)
    training_columns: list[tuple[_Loc, Any]] = field(default_factory=list)


def load_spec(directory: str | os.PathLike[str]) -> PolicySpec:
    """Read and validate the policy directory; raises :class:`PolicyInvalid`."""
    return parse_policy(read_policy_dir(directory))


def parse_policy(files: Mapping[str, bytes]) -> PolicySpec:
    """Validate a policy given as ``{relative path: bytes}``; raises :class:`PolicyInvalid`."""
    problems = _Problems()
    if not files:
        raise PolicyInvalid([PolicyProblem("<policy>", None, "", "no policy files")])
    sections = _Sections()
    reader = _Reader(problems)
    for name in sorted(files):
        parsed = _parse_yaml(name, files[name], problems)
        if parsed is None:
            continue
        file, data = parsed
        root = _Loc(file, ())
        if data is None:
            continue
        doc = reader.mapping(root, data, _TOP_KEYS)
        if doc is None:
            continue
        for key in _TOP_KEYS:
            if key in doc:
                section: list[tuple[_Loc, Any]] = getattr(sections, key)
                section.append((root.sub(key), doc[key]))
    builder = _Builder(reader, min(files))
    spec = builder.build(sections, files)
    if problems.items or spec is None:
        raise PolicyInvalid(problems.items)
    return spec


class _Builder:
    def __init__(self, reader: _Reader, first_file: str) -> None:
        self.r = reader
        self.p = reader.p
        self.first_file = first_file
        self.class_rank: dict[str, int] = {}

    # Every list section: items with their locations.
    def _items(self, entries: list[tuple[_Loc, Any]]) -> Iterable[tuple[_Loc, Any]]:
        for loc, value in entries:
            if not isinstance(value, list):
                self.p.add(loc, _wrong_type("a list", value))
                continue
            for i, item in enumerate(value):
                yield loc.sub(i), item

    def _named(self, entries: list[tuple[_Loc, Any]], kind: str) -> Iterable[tuple[_Loc, str, Any]]:
        seen: dict[str, _Loc] = {}
        for loc, value in entries:
            if not isinstance(value, dict):
                self.p.add(loc, _wrong_type(f"a mapping of {kind} names", value))
                continue
            for name, item in value.items():
                item_loc = loc.sub(name)
                if not _NAME.fullmatch(name):
                    self.p.add(item_loc, f"invalid {kind} name {name!r}", key=True)
                    continue
                if name in seen:
                    self.p.add(
                        item_loc,
                        f"{kind} {name!r} already defined at {seen[name].where()}",
                        key=True,
                    )
                    continue
                seen[name] = item_loc
                yield item_loc, name, item

    def build(self, s: _Sections, files: Mapping[str, bytes]) -> PolicySpec | None:
        classes = self._classes(s.classes)
        purposes = self._purposes(s.purposes)
        destinations = self._destinations(s.destinations)
        applications = self._applications(s.applications, purposes)
        detectors = self._detectors(s.detectors, classes)
        rules = self._rules(s.rules, classes, purposes, destinations, applications)
        tests = self._tests(s.tests, classes, purposes, rules, detectors)
        training_columns = self._training_columns(s.training_columns, classes)
        if classes is None:
            return None
        return PolicySpec(
            classes=classes,
            detectors=detectors,
            applications=MappingProxyType(applications),
            purposes=purposes,
            destinations=MappingProxyType(destinations),
            rules=rules,
            tests=tests,
            training_columns=training_columns,
            files=tuple(sorted(files)),
            digest=directory_digest(files),
        )

    def _classes(self, entries: list[tuple[_Loc, Any]]) -> tuple[str, ...] | None:
        if not entries:
            self.p.items.append(
                PolicyProblem(self.first_file, None, "", "no file defines 'classes' (required)")
            )
            return None
        loc, value = entries[0]
        for extra_loc, _ in entries[1:]:
            self.p.add(extra_loc, f"'classes' already defined at {loc.where()}", key=True)
        classes = self.r.string_list(loc, value, _NAME, "class name")
        if classes is None:
            return None
        self.class_rank = {name: i for i, name in enumerate(classes)}
        return classes

    def _purposes(self, entries: list[tuple[_Loc, Any]]) -> tuple[str, ...]:
        out: list[str] = []
        first: dict[str, _Loc] = {}
        for loc, value in entries:
            names = self.r.string_list(loc, value, _NAME, "purpose name")
            for i, name in enumerate(names or ()):
                if name in first:
                    self.p.add(
                        loc.sub(i), f"purpose {name!r} already defined at {first[name].where()}"
                    )
                else:
                    first[name] = loc.sub(i)
                    out.append(name)
        return tuple(out)

    def _destinations(self, entries: list[tuple[_Loc, Any]]) -> dict[str, Destination]:
        out: dict[str, Destination] = {}
        for loc, name, value in self._named(entries, "destination"):
            if value is None:
                value = {}
            item = self.r.mapping(loc, value, _DESTINATION_KEYS, required=("jurisdictions",))
            if item is None:
                continue
            fields: dict[str, tuple[str, ...]] = {}
            ok = True
            for key in _DESTINATION_KEYS:
                if key in item:
                    pattern = _MODEL if key == "models" else _NAME
                    parsed = self.r.string_list(loc.sub(key), item[key], pattern, key[:-1])
                    if parsed is None:
                        ok = False
                    else:
                        fields[key] = parsed
            if ok and "jurisdictions" in fields:
                out[name] = Destination(name=name, source=loc.source(), **fields)
        return out

    def _applications(
        self, entries: list[tuple[_Loc, Any]], purposes: tuple[str, ...]
    ) -> dict[str, Application]:
        out: dict[str, Application] = {}
        for loc, name, value in self._named(entries, "application"):
            item = self.r.mapping(loc, value, _APPLICATION_KEYS, required=("purposes",))
            if item is None:
                continue
            description = ""
            if "description" in item:
                description = self.r.text(loc.sub("description"), item["description"]) or ""
            if "purposes" not in item:
                continue
            allowed = self.r.refs(
                loc.sub("purposes"),
                self.r.string_list(loc.sub("purposes"), item["purposes"], _NAME, "purpose"),
                purposes,
                "purpose",
            )
            if allowed is not None:
                out[name] = Application(name, description, allowed, loc.source())
        return out

    def _detectors(
        self, entries: list[tuple[_Loc, Any]], classes: tuple[str, ...] | None
    ) -> tuple[DetectorSpec, ...]:
        out: list[DetectorSpec] = []
        seen: dict[str, _Loc] = {}
        for loc, value in self._items(entries):
            item = self.r.mapping(loc, value, _DETECTOR_KEYS, required=("class",))
            if item is None:
                continue
            data_class = None
            if "class" in item:
                data_class = self.r.string(loc.sub("class"), item["class"], _NAME, "class name")
            if data_class is not None and classes is not None and data_class not in classes:
                self.r.undefined(loc.sub("class"), data_class, classes, "class")
                data_class = None
            spec = self._detector_kind(loc, item)
            if spec is None or data_class is None:
                continue
            kind, entity_type, extra = spec
            if entity_type in seen:
                self.p.add(
                    loc,
                    f"detector for {entity_type!r} already enabled at {seen[entity_type].where()}",
                )
                continue
            seen[entity_type] = loc
            out.append(
                DetectorSpec(entity_type, data_class, kind, source=loc.source(), **extra)  # type: ignore[arg-type]
            )
        return tuple(out)

    def _detector_kind(
        self, loc: _Loc, item: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]] | None:
        has_builtin, has_name = "builtin" in item, "name" in item
        if has_builtin == has_name:
            self.p.add(loc, "a detector needs exactly one of 'builtin' or 'name'")
            return None
        if has_builtin:
            for key in ("regex", "keywords", "validator", "case_sensitive"):
                if key in item:
                    self.p.add(loc.sub(key), f"{key!r} is not allowed with 'builtin'", key=True)
            name = self.r.string(loc.sub("builtin"), item["builtin"], None)
            if name is None:
                return None
            if name not in BUILTIN_TYPES:
                self.r.undefined(loc.sub("builtin"), name, BUILTIN_TYPES, "built-in detector")
                return None
            return "builtin", name, {}
        name = self.r.string(loc.sub("name"), item["name"], _ENTITY_TYPE, "entity type")
        if name is None:
            return None
        if name in BUILTIN_TYPES:
            self.p.add(loc.sub("name"), f"{name!r} is a built-in type; use 'builtin: {name}'")
            return None
        if ("regex" in item) == ("keywords" in item):
            self.p.add(loc, "a custom detector needs exactly one of 'regex' or 'keywords'")
            return None
        if "regex" in item:
            if "case_sensitive" in item:
                self.p.add(loc.sub("case_sensitive"), "only valid with 'keywords'", key=True)
            pattern = self.r.text(loc.sub("regex"), item["regex"])
            if pattern is None:
                return None
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                self.p.add(loc.sub("regex"), f"invalid regular expression: {exc}")
                return None
            if compiled.fullmatch(""):
                self.p.add(loc.sub("regex"), "regular expression matches the empty string")
                return None
            validator = None
            if "validator" in item:
                validator = self.r.string(loc.sub("validator"), item["validator"], None)
                if validator is None:
                    return None
                if validator not in VALIDATORS:
                    self.r.undefined(
                        loc.sub("validator"), validator, sorted(VALIDATORS), "validator"
                    )
                    return None
            return "regex", name, {"pattern": pattern, "validator": validator}
        if "validator" in item:
            self.p.add(loc.sub("validator"), "only valid with 'regex'", key=True)
        keywords = self.r.string_list(loc.sub("keywords"), item["keywords"], None, "keyword")
        if keywords is None:
            return None
        if any(not k.strip() for k in keywords):
            self.p.add(loc.sub("keywords"), "keywords must not be blank")
            return None
        case_sensitive = item.get("case_sensitive", False)
        if not isinstance(case_sensitive, bool):
            self.p.add(loc.sub("case_sensitive"), _wrong_type("a boolean", case_sensitive))
            return None
        return "keywords", name, {"keywords": keywords, "case_sensitive": case_sensitive}

    def _rules(
        self,
        entries: list[tuple[_Loc, Any]],
        classes: tuple[str, ...] | None,
        purposes: tuple[str, ...],
        destinations: Mapping[str, Destination],
        applications: Mapping[str, Application],
    ) -> tuple[Rule, ...]:
        out: list[Rule] = []
        seen: dict[str, _Loc] = {}
        for loc, value in self._items(entries):
            item = self.r.mapping(loc, value, _RULE_KEYS, required=("id", "match", "effect"))
            if item is None:
                continue
            rule_id = None
            if "id" in item:
                rule_id = self.r.string(loc.sub("id"), item["id"], _RULE_ID, "rule id")
            if rule_id is not None and rule_id in seen:
                self.p.add(
                    loc.sub("id"),
                    f"duplicate rule id {rule_id!r} (first at {seen[rule_id].where()})",
                )
                rule_id = None
            elif rule_id is not None:
                seen[rule_id] = loc
            description = ""
            if "description" in item:
                description = self.r.text(loc.sub("description"), item["description"]) or ""
            effect = self._effect(loc.sub("effect"), item["effect"]) if "effect" in item else None
            match = None
            if "match" in item:
                match = self._match(
                    loc.sub("match"), item["match"], classes, purposes, applications
                )
            destination, obligations = self._destination_and_obligations(
                loc, item, effect, classes, destinations
            )
            if rule_id is None or effect is None or match is None or obligations is None:
                continue
            out.append(
                Rule(rule_id, effect, match, destination, obligations, description, loc.source())
            )
        return tuple(out)

    def _effect(self, loc: _Loc, value: Any) -> Effect | None:
        name = self.r.string(loc, value, None)
        if name is None:
            return None
        if name not in _EFFECTS:
            self.p.add(loc, f"unknown effect {name!r} (expected: {', '.join(_EFFECTS)})")
            return None
        return Effect(name)

    def _match(
        self,
        loc: _Loc,
        value: Any,
        classes: tuple[str, ...] | None,
        purposes: tuple[str, ...],
        applications: Mapping[str, Application],
    ) -> Match | None:
        item = self.r.mapping(loc, value, _MATCH_KEYS)
        if item is None:
            return None
        if not item:
            self.p.add(loc, "match names no condition; an empty match would match every request")
            return None
        ok = True

        def names(
            key: str, pattern: re.Pattern[str], known: Iterable[str] | None, kind: str
        ) -> tuple[str, ...] | None:
            nonlocal ok
            if key not in item:
                return None
            parsed = self.r.string_list(loc.sub(key), item[key], pattern, kind)
            if parsed is not None and known is not None:
                parsed = self.r.refs(loc.sub(key), parsed, known, kind)
            if parsed is None:
                ok = False
            return parsed

        apps = names("applications", _NAME, applications, "application")
        purps = names("purposes", _NAME, purposes, "purpose")
        models = names("models", _MODEL, None, "model")
        present = names("classes_present", _NAME, classes, "class")
        max_class: str | None = None
        if "max_class" in item:
            max_class = self.r.string(loc.sub("max_class"), item["max_class"], _NAME, "class name")
            if max_class is not None and classes is not None and max_class not in classes:
                self.r.undefined(loc.sub("max_class"), max_class, classes, "class")
                max_class = None
            if max_class is None:
                ok = False
        if not ok or classes is None:
            return None
        if present is not None and max_class is not None:
            limit = self.class_rank[max_class]
            above = [c for c in present if self.class_rank[c] > limit]
            if above:
                self.p.add(
                    loc.sub("classes_present"),
                    f"classes {above} are above max_class {max_class!r}; the rule can never match",
                )
                return None
        return Match(apps, purps, models, present, max_class)

    def _destination_and_obligations(
        self,
        loc: _Loc,
        item: dict[str, Any],
        effect: Effect | None,
        classes: tuple[str, ...] | None,
        destinations: Mapping[str, Destination],
    ) -> tuple[str | None, Obligations | None]:
        leaves = effect in (Effect.ALLOW, Effect.PSEUDONYMISE)
        if effect is None:
            return None, None
        if not leaves:
            for key in ("destination", "obligations"):
                if key in item:
                    self.p.add(
                        loc.sub(key),
                        f"{key!r} is meaningless for effect {effect.value!r} (nothing leaves)",
                        key=True,
                    )
            return None, NO_OBLIGATIONS
        if "destination" not in item:
            self.p.add(loc, f"effect {effect.value!r} needs a 'destination'")
            return None, None
        dest_name = self.r.string(loc.sub("destination"), item["destination"], _NAME, "destination")
        if dest_name is None:
            return None, None
        destination = destinations.get(dest_name)
        if destination is None:
            self.r.undefined(loc.sub("destination"), dest_name, list(destinations), "destination")
            return None, None
        raw = item.get("obligations", {})
        oloc = loc.sub("obligations")
        ob = self.r.mapping(oloc, raw if raw is not None else {}, _OBLIGATION_KEYS)
        if ob is None:
            return None, None
        ok = True

        def subset(key: str, allowed: tuple[str, ...], kind: str) -> tuple[str, ...]:
            nonlocal ok
            if key not in ob:
                return allowed
            parsed = self.r.string_list(oloc.sub(key), ob[key], _NAME, kind)
            if parsed is None:
                ok = False
                return ()
            for i, name in enumerate(parsed):
                if name not in allowed:
                    self.p.add(
                        oloc.sub(key, i),
                        f"{kind} {name!r} is not offered by destination {dest_name!r} "
                        f"(it offers: {', '.join(allowed) or 'none'})",
                    )
                    ok = False
            return parsed

        jurisdictions = subset("allowed_jurisdictions", destination.jurisdictions, "jurisdiction")
        tee_types = subset("accepted_tee_types", destination.tee_types, "TEE type")
        min_attestation = "affirming"
        if "min_attestation" in ob:
            level = self.r.string(oloc.sub("min_attestation"), ob["min_attestation"], None)
            if level not in ATTESTATION_LEVELS:
                if level is not None:
                    self.p.add(
                        oloc.sub("min_attestation"),
                        f"unknown attestation level {level!r} "
                        f"(expected: {', '.join(ATTESTATION_LEVELS)})",
                    )
                ok = False
            else:
                min_attestation = level
        retention = "none"
        if "retention" in ob:
            value = self.r.string(oloc.sub("retention"), ob["retention"], None)
            if value is None or not _RETENTION.fullmatch(value):
                if value is not None:
                    self.p.add(
                        oloc.sub("retention"),
                        f'invalid retention {value!r} ("none" or an ISO 8601 duration like P30D)',
                    )
                ok = False
            else:
                retention = value
        pseudonymise_classes: tuple[str, ...] = ()
        if effect is Effect.PSEUDONYMISE and classes is not None:
            if "pseudonymise_classes" in ob:
                loc_pc = oloc.sub("pseudonymise_classes")
                parsed = self.r.refs(
                    loc_pc,
                    self.r.string_list(loc_pc, ob["pseudonymise_classes"], _NAME, "class"),
                    classes,
                    "class",
                )
                if parsed is None:
                    ok = False
                else:
                    pseudonymise_classes = tuple(sorted(parsed, key=self.class_rank.__getitem__))
            elif _DEFAULT_PSEUDONYMISE_FROM in self.class_rank:
                start = self.class_rank[_DEFAULT_PSEUDONYMISE_FROM]
                pseudonymise_classes = classes[start:]
            else:
                self.p.add(
                    loc,
                    "no class named 'confidential' to default from: "
                    "set obligations.pseudonymise_classes",
                )
                ok = False
        elif "pseudonymise_classes" in ob:
            self.p.add(
                oloc.sub("pseudonymise_classes"),
                "only valid when effect is 'pseudonymise'",
                key=True,
            )
            ok = False
        if not ok:
            return None, None
        return dest_name, Obligations(
            allowed_jurisdictions=jurisdictions,
            accepted_tee_types=tee_types,
            min_attestation=min_attestation,
            retention=retention,
            pseudonymise_classes=pseudonymise_classes,
        )

    def _training_columns(
        self, entries: list[tuple[_Loc, Any]], classes: tuple[str, ...] | None
    ) -> Mapping[str, str]:
        """``training_columns: {class: keep|pseudonymise|drop}`` (merged; a class once)."""
        out: dict[str, str] = {}
        seen: dict[str, _Loc] = {}
        for loc, value in entries:
            if not isinstance(value, dict):
                self.p.add(loc, _wrong_type("a mapping of class: action", value))
                continue
            for cls, action in value.items():
                item = loc.sub(cls)
                if classes is not None and cls not in classes:
                    self.r.undefined(item, cls, classes, "class")
                    continue
                if cls in seen:
                    self.p.add(item, f"class {cls!r} already has an action at {seen[cls].where()}")
                    continue
                if action not in COLUMN_ACTIONS:
                    self.p.add(
                        item,
                        f"unknown column action {action!r} (expected: {', '.join(COLUMN_ACTIONS)})",
                    )
                    continue
                seen[cls] = item
                out[cls] = action
        return MappingProxyType(out)

    def _tests(
        self,
        entries: list[tuple[_Loc, Any]],
        classes: tuple[str, ...] | None,
        purposes: tuple[str, ...],
        rules: tuple[Rule, ...],
        detectors: tuple[DetectorSpec, ...],
    ) -> tuple[PolicyTestCase, ...]:
        out: list[PolicyTestCase] = []
        names: dict[str, _Loc] = {}
        rule_ids = [r.id for r in rules]
        entity_types = [d.entity_type for d in detectors]
        for loc, value in self._items(entries):
            item = self.r.mapping(
                loc,
                value,
                _TEST_KEYS,
                required=("name", "app", "purpose", "model", "text", "expect"),
            )
            if item is None:
                continue
            name = self.r.text(loc.sub("name"), item["name"]) if "name" in item else None
            if name is not None and not name.strip():
                self.p.add(loc.sub("name"), "test name must not be blank")
                name = None
            elif name is not None and name in names:
                self.p.add(
                    loc.sub("name"),
                    f"duplicate test name {name!r} (first at {names[name].where()})",
                )
                name = None
            elif name is not None:
                names[name] = loc
            app = self._opt(loc, item, "app", _NAME, "application name")
            purpose = self._opt(loc, item, "purpose", _NAME, "purpose name")
            model = self._opt(loc, item, "model", _MODEL, "model name")
            text = self.r.text(loc.sub("text"), item["text"]) if "text" in item else None
            labels: tuple[str, ...] | None = ()
            if "labels" in item:
                labels = self.r.string_list(loc.sub("labels"), item["labels"], _NAME, "class")
                if classes is not None:
                    labels = self.r.refs(loc.sub("labels"), labels, classes, "class")
            expect = None
            if "expect" in item:
                expect = self._expect(loc.sub("expect"), item["expect"], rule_ids, entity_types)
            if None in (name, app, purpose, model, text, labels, expect):
                continue
            out.append(
                PolicyTestCase(
                    name=name,  # type: ignore[arg-type]
                    app=app,  # type: ignore[arg-type]
                    purpose=purpose,  # type: ignore[arg-type]
                    model=model,  # type: ignore[arg-type]
                    text=text,  # type: ignore[arg-type]
                    expect=expect,  # type: ignore[arg-type]
                    labels=labels or (),
                    source=loc.source(),
                )
            )
        del purposes  # tests may name undefined purposes on purpose (to test the default deny)
        return tuple(out)

    def _opt(
        self, loc: _Loc, item: dict[str, Any], key: str, pattern: re.Pattern[str], what: str
    ) -> str | None:
        return self.r.string(loc.sub(key), item[key], pattern, what) if key in item else None

    def _expect(
        self, loc: _Loc, value: Any, rule_ids: list[str], entity_types: list[str]
    ) -> Expectation | None:
        item = self.r.mapping(loc, value, _EXPECT_KEYS, required=("effect",))
        if item is None or "effect" not in item:
            return None
        effect = self._effect(loc.sub("effect"), item["effect"])
        rule: str | None = None
        if "rule" in item and item["rule"] is not None:
            rule = self.r.string(loc.sub("rule"), item["rule"], _RULE_ID, "rule id")
            if rule is None:
                return None
            if rule not in rule_ids:
                self.r.undefined(loc.sub("rule"), rule, rule_ids, "rule")
                return None
        entities: dict[str, int] | None = None
        if "entities" in item:
            raw = item["entities"]
            if not isinstance(raw, dict):
                self.p.add(loc.sub("entities"), _wrong_type("a mapping of TYPE: count", raw))
                return None
            entities = {}
            for etype, count in raw.items():
                eloc = loc.sub("entities", etype)
                if etype not in entity_types:
                    self.r.undefined(eloc, etype, entity_types, "entity type (no detector)")
                    return None
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    self.p.add(eloc, _wrong_type("a non-negative integer", count))
                    return None
                entities[etype] = count
        if effect is None:
            return None
        return Expectation(
            effect=effect,
            rule=rule,
            check_rule="rule" in item,
            entities=MappingProxyType(entities) if entities is not None else None,
        )
