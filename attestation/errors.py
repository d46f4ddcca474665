"""Why evidence was refused. Each failure has its own type; messages never hold key material."""

from __future__ import annotations


class AttestationError(Exception):
    """Base of every refusal of evidence."""


class EvidenceMalformed(AttestationError):
    """The evidence bytes do not parse as the format they claim."""


class EvidenceSignatureInvalid(AttestationError):
    """The evidence signature does not verify under the device key it presents."""


class UntrustedChain(AttestationError):
    """The device certificate does not chain to a configured vendor root."""


class KeyBindingMismatch(AttestationError):
    """The evidence does not bind the public key, epoch or nonce it is offered with."""


class CompositeBindingMismatch(KeyBindingMismatch):
    """A device report of composite evidence (an NPU report) is not bound to the CVM report it
    travels with: it was taken from another CVM's evidence."""


class EvidenceStale(AttestationError):
    """The evidence is older than reference values allow, or the bound key has expired."""


class AppraisalFailed(AttestationError):
    """The evidence is genuine but the reference values do not accept what it reports."""


class ReferenceValuesInvalid(AttestationError):
    """The reference values file is missing, unreadable or invalid."""
