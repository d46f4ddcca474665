"""Minimal policy: deny by default, allow an app the models on its allow-list.

A seam: the full policy engine (git-signed policy files) replaces :class:`ConfigPolicy` and keeps
:meth:`decide` and :class:`Decision`. ``policy_id`` names the policy that decided: here
``config:`` + the first 12 hex digits of the SHA-256 of the canonical ``[[apps]]`` section.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from edge_agent.config import AppConfig

PURPOSES: Final = ("inference",)
RULE_DEFAULT_DENY: Final = "default-deny"


@dataclass(frozen=True)
class Decision:
    effect: Literal["allow", "deny"]
    rule_id: str
    policy_id: str
    reason: str

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


def policy_id_for(apps: Sequence[AppConfig]) -> str:
    canonical = json.dumps(
        [
            {"key_sha256": a.key_sha256, "models": list(a.models), "name": a.name}
            for a in sorted(apps, key=lambda a: a.name)
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    return "config:" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


class ConfigPolicy:
    def __init__(self, apps: Sequence[AppConfig]) -> None:
        self._apps = {a.name: a for a in apps}
        self.policy_id = policy_id_for(apps)

    def decide(self, app: str, purpose: str, model: str) -> Decision:
        cfg = self._apps.get(app)
        if purpose not in PURPOSES:
            return self._deny(f"purpose {purpose!r} is not allowed by the edge config")
        if cfg is None:
            return self._deny(f"app {app!r} is not configured")
        if model not in cfg.models:
            return self._deny(f"model {model!r} is not on app {app!r}'s allow-list")
        return Decision(
            "allow", f"apps.{app}.models", self.policy_id, f"model {model!r} is allow-listed"
        )

    def _deny(self, reason: str) -> Decision:
        return Decision("deny", RULE_DEFAULT_DENY, self.policy_id, reason)
