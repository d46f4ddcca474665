"""Exceptions raised by the Arm CCA attestation token verifier (:mod:`attestation.cca`).

Every exception derives from :class:`CCAError`; ``str(exc)`` is a human-readable reason that
names the part of the token (platform / realm / collection) and the claim or header involved.
"""

from __future__ import annotations

__all__ = [
    "BindingMismatch",
    "CCAError",
    "ChallengeMismatch",
    "InvalidTrustAnchor",
    "MalformedToken",
    "SignatureInvalid",
    "UnsupportedAlgorithm",
    "UntrustedPlatformKey",
]


class CCAError(Exception):
    """Base class of every CCA verification failure; ``str(e)`` is a clear human reason."""


class MalformedToken(CCAError):
    """Not CBOR, trailing bytes, duplicate map keys, wrong tags/structure/types, missing claims."""


class UnsupportedAlgorithm(CCAError):
    """COSE alg not ES256/ES384/ES512, unknown critical header, or key curve does not match alg."""


class SignatureInvalid(CCAError):
    """A COSE_Sign1 signature does not verify; the message says whether platform or realm."""


class UntrustedPlatformKey(SignatureInvalid):
    """The platform token signature verifies with none of the supplied trust anchors.

    A platform token that was altered after signing and one signed by an unknown key are
    cryptographically indistinguishable, so both end here. It subclasses
    :class:`SignatureInvalid` so that ``except SignatureInvalid`` also covers it.
    """


class BindingMismatch(CCAError):
    """Platform challenge is not the hash of the realm public key (both signatures are valid)."""


class ChallengeMismatch(CCAError):
    """The realm challenge differs from the challenge the verifier expected."""


class InvalidTrustAnchor(CCAError, ValueError):
    """A trust anchor file could not be parsed into supported EC public keys."""
