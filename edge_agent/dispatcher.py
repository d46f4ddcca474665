"""One API request from decision to reply: policy, verified candidates, seal, broker, open, audit.

Every request that got past authentication and body checks ends in exactly one ``request``
audit record (metadata only), whether it succeeded, was refused, failed upstream or the client
went away mid-stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent import content
from edge_agent.broker_client import BrokerCallError, BrokerClient, StreamCall
from edge_agent.config import AppConfig, EdgeConfig
from edge_agent.errors import ApiError, ReplyIntegrityError, internal_error
from edge_agent.local_model import LocalModel
from edge_agent.policy import (
    Assessment,
    ConstraintConflict,
    Decision,
    InputTooLarge,
    PolicyDecider,
    PolicyUnavailable,
    sealed_constraints,
)
from edge_agent.sealing import (
    ReplyOpener,
    RequestMeta,
    SealedRequest,
    header_constraints,
    is_done_marker,
    open_unary,
    seal,
)
from edge_agent.trusted_set import Clock, TrustedEnclaveSet, TrustedKey, wall_clock_ms
from sovra import suites
from sovra.audit import AuditLog
from sovra.envelope import Constraints, new_request_id
from sovra.policy import MappingStore, MappingStoreError, Pseudonymiser, PseudonymiserFull

log = logging.getLogger("sovra.edge")

AUDIT_KIND: Final = "request"
PURPOSE: Final = "inference"
SSE_DONE: Final = b"data: [DONE]\n\n"
STATUS_CLIENT_GONE: Final = 499  # nginx's "client closed request": no reply could be sent
DESTINATION_LOCAL: Final = "local"
_REASON_CHARS: Final = 300


@dataclass
class RequestRecord:
    """What is known about one request: audited and logged. Never prompts or replies."""

    request_id: bytes
    app: str
    model: str
    op: str
    stream: bool
    started: float = field(default_factory=time.monotonic)
    decision: Decision | None = None
    purpose: str = PURPOSE
    destination: str | None = None  # the policy's destination, or "local" (keep-local)
    enclaves: tuple[tuple[str, int, bool], ...] = ()  # id, epoch, simulated (verified)
    served_by: str | None = None
    outcome: str = "pending"
    status: int = 0
    reason: str = ""
    finished: bool = False

    @property
    def request_id_hex(self) -> str:
        return self.request_id.hex()

    def audit_record(self) -> dict[str, Any]:
        d = self.decision
        record: dict[str, Any] = {
            "request_id": self.request_id_hex,
            "app": self.app,
            "model": self.model,
            "op": self.op,
            "stream": self.stream,
            "purpose": self.purpose,
            "decision": d.effect if d else None,
            "rule": d.rule_id if d else None,
            "policy_id": d.policy_id if d else None,
            # Classes and entity counts, never the values found.
            "classes": list(d.classes) if d else [],
            "entity_counts": dict(d.entity_counts) if d else {},
            "destination": self.destination,
            "enclaves": [{"id": e, "epoch": n, "simulated": sim} for e, n, sim in self.enclaves],
            "served_by": self.served_by,
            "outcome": self.outcome,
            "status": self.status,
            "latency_ms": int((time.monotonic() - self.started) * 1000),
        }
        if self.reason:
            record["reason"] = self.reason
        return record


def sse_event(obj: dict[str, Any]) -> bytes:
    # json.dumps escapes newlines, so one event is always one "data:" line.
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def broker_error(exc: BrokerCallError) -> ApiError:
    """Map a broker gRPC status to the HTTP error the app sees (docs/edge.md)."""
    detail = f"broker: {exc.details or exc.code.name}"
    code = exc.code
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(503, "no_enclave_available", detail)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(503, "enclaves_unavailable", detail)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ApiError(403, "broker_permission_denied", detail)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(502, "broker_rejected_request", detail)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, "upstream_timeout", detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a broker quota (the message names it)
        return ApiError(429, "quota_exceeded", detail)
    return ApiError(502, "broker_error", f"{detail} ({code.name})")


@dataclass(eq=False)
class _Plan:
    """What the policy made of one request: the body to send (pseudonymised if so decided),
    the sealed constraints, and the mapping to restore the reply with."""

    assessment: Assessment
    body: dict[str, Any] = field(repr=False)
    constraints: Constraints | None = None
    pseudonymiser: Pseudonymiser | None = field(default=None, repr=False)
    local: bool = False

    @property
    def decision(self) -> Decision:
        return self.assessment.decision


class Dispatcher:
    def __init__(
        self,
        config: EdgeConfig,
        *,
        policy: PolicyDecider,
        trusted: TrustedEnclaveSet,
        broker: BrokerClient,
        signing_key: ed25519.Ed25519PrivateKey,
        audit: AuditLog,
        clock: Clock = wall_clock_ms,
        mappings: MappingStore | None = None,
        mapping_ttl_s: int = 3600,
        local: LocalModel | None = None,
    ) -> None:
        self._config = config
        self._policy = policy
        self._mappings = mappings
        self._mapping_ttl_s = mapping_ttl_s
        self._local = local
        self._trusted = trusted
        self._broker = broker
        self._signing_key = signing_key
        self._audit = audit
        self._clock = clock
        self._constraints = header_constraints(config.constraints)
        self._kem = suites.suite_by_name(config.suite).kem
        self._configured_models = {m for app in config.apps for m in app.models}
        self._synced_generation = 0

    def new_record(self, app: str, model: str, op: str, stream: bool) -> RequestRecord:
        return RequestRecord(new_request_id(), app, model, op, stream)

    # -- unary ----------------------------------------------------------------------------------

    async def complete(
        self, rec: RequestRecord, body: dict[str, Any], *, conversation: str | None = None
    ) -> dict[str, Any]:
        """``conversation``: the app's ``X-Sovra-Conversation`` header, if it sent one."""
        try:
            plan = self._decide(rec, body, conversation)
            if plan.local:
                assert self._local is not None
                result = await self._local.complete(rec.op, plan.body)
            else:
                sealed, candidates = await self._prepare(rec, plan)
                try:
                    reply = await self._broker.dispatch(sealed.envelope)
                except BrokerCallError as exc:
                    raise self._broker_refusal(rec, exc) from None
                self._served_by(rec, candidates, reply.enclave_id)
                result = open_unary(sealed.secrets, reply.frame)
                if plan.pseudonymiser is not None:
                    result = content.restore_reply(result, plan.pseudonymiser)
        except ApiError as err:
            await self._fail(rec, err)
            raise
        except Exception as exc:
            raise await self._internal(rec, exc) from None
        await self._succeed(rec)  # the audit record is on disk before the app gets the reply
        return result

    # -- streaming ------------------------------------------------------------------------------

    async def stream(
        self, rec: RequestRecord, body: dict[str, Any], *, conversation: str | None = None
    ) -> AsyncIterator[bytes]:
        """Reads up to the first chunk (so early errors are HTTP errors), then streams SSE."""
        call: StreamCall | None = None
        try:
            plan = self._decide(rec, body, conversation)
            if plan.local:
                return await self._local_stream(rec, plan)
            sealed, candidates = await self._prepare(rec, plan)
            call = self._broker.dispatch_stream(sealed.envelope)
            opener = ReplyOpener(sealed.secrets)
            first = await self._next_chunk(rec, candidates, call, opener)
        except ApiError as err:
            _cancel(call)
            await self._fail(rec, err)
            raise
        except Exception as exc:
            _cancel(call)
            raise await self._internal(rec, exc) from None
        restorer = None if plan.pseudonymiser is None else content.ChunkRestorer(plan.pseudonymiser)
        return self._events(rec, candidates, call, opener, first, restorer)

    async def _events(
        self,
        rec: RequestRecord,
        candidates: Sequence[TrustedKey],
        call: StreamCall,
        opener: ReplyOpener,
        chunk: dict[str, Any] | None,
        restorer: content.ChunkRestorer | None = None,
    ) -> AsyncIterator[bytes]:
        failure: ApiError | None = None
        try:
            while chunk is not None:
                yield sse_event(chunk if restorer is None else restorer.chunk(chunk))
                chunk = await self._next_chunk(rec, candidates, call, opener)
            tail = restorer.flush() if restorer is not None else None
            if tail is not None:
                yield sse_event(tail)
            await self._succeed(rec)
        except ApiError as err:
            failure = err
            await self._fail(rec, err)
        except Exception as exc:
            failure = await self._internal(rec, exc)
        finally:
            call.cancel()
            if not rec.finished:  # the client went away (the generator was closed)
                rec.outcome, rec.status = "client_disconnected", STATUS_CLIENT_GONE
                self._finish_now(rec)
        if failure is not None:
            yield sse_event(failure.body())
        yield SSE_DONE

    async def _next_chunk(
        self,
        rec: RequestRecord,
        candidates: Sequence[TrustedKey],
        call: StreamCall,
        opener: ReplyOpener,
    ) -> dict[str, Any] | None:
        """The next verified chunk to forward, or None after the end marker."""
        while not opener.done:
            try:
                reply = await call.read()
            except BrokerCallError as exc:
                raise self._broker_refusal(rec, exc) from None
            if reply is None:
                opener.finish()  # raises: the stream ended without its end marker
                return None
            self._served_by(rec, candidates, reply.enclave_id)
            obj = opener.open(reply.frame)
            if not is_done_marker(obj):
                return obj
        return None

    # -- shared steps ---------------------------------------------------------------------------

    def _decide(self, rec: RequestRecord, body: dict[str, Any], conversation: str | None) -> _Plan:
        """Model known -> policy decision -> (keep local | constraints, pseudonymised body)."""
        if conversation is not None:
            content.check_conversation_header(conversation)
        known = self._configured_models | self._policy.known_models()
        if rec.model not in known | self._trusted.listed_models():
            raise ApiError(
                404,
                "model_not_found",
                f"the model {rec.model!r} does not exist or you do not have access to it",
                param="model",
            )
        texts = content.texts_of(body) if self._policy.classifies else []
        try:
            assessment = self._policy.assess(rec.app, rec.purpose, rec.model, texts)
        except InputTooLarge as exc:
            raise ApiError(413, "request_too_large", str(exc)) from None
        except PolicyUnavailable as exc:
            raise ApiError(503, "policy_unavailable", str(exc)) from None
        decision = assessment.decision
        rec.decision = decision
        where = f"policy rule {decision.rule_id!r} ({decision.policy_id})"
        if decision.effect == "deny":
            raise ApiError(403, "policy_denied", f"denied by {where}: {decision.reason}")
        if decision.effect == "keep-local":
            if self._local is None:
                raise ApiError(
                    403,
                    "keep_local",
                    f"{where} keeps this request on the premises and this edge has no local "
                    f"model ([policy] local_upstream): {decision.reason}",
                )
            rec.destination = DESTINATION_LOCAL
            return _Plan(assessment, body, local=True)
        try:
            constraints = sealed_constraints(self._constraints, decision)
        except ConstraintConflict as exc:
            raise ApiError(403, "policy_denied", f"denied by {where}: {exc}") from None
        rec.destination = decision.destination
        if not assessment.rewrites:
            return _Plan(assessment, body, constraints)
        conversation_id = content.conversation_id(rec.app, conversation, body)
        pseudonymiser = self._mapping_for(conversation_id)
        try:
            outbound = content.replace_texts(body, assessment.outbound(texts, pseudonymiser))
        except PseudonymiserFull:
            raise ApiError(
                413,
                "conversation_too_large",
                "this conversation's pseudonym mapping is full; start a new conversation",
            ) from None
        self._keep_mapping(conversation_id, pseudonymiser)
        return _Plan(assessment, outbound, constraints, pseudonymiser)

    def _mapping_for(self, conversation_id: str | None) -> Pseudonymiser:
        if conversation_id is None or self._mappings is None:
            return Pseudonymiser()
        try:
            found = self._mappings.get(conversation_id)
        except (MappingStoreError, ValueError) as exc:
            # Unusable (tampered, wrong key): start afresh rather than fail the request.
            log.warning("pseudonym mapping unusable, starting a new one: %s", type(exc).__name__)
            return Pseudonymiser()
        return found if found is not None else Pseudonymiser()

    def _keep_mapping(self, conversation_id: str | None, pseudonymiser: Pseudonymiser) -> None:
        if conversation_id is None or self._mappings is None or not len(pseudonymiser):
            return
        try:
            self._mappings.put(conversation_id, pseudonymiser, self._mapping_ttl_s)
        except Exception as exc:  # the reply is restored from memory; later turns renumber
            log.warning("could not store a pseudonym mapping: %s", type(exc).__name__)

    async def _local_stream(self, rec: RequestRecord, plan: _Plan) -> AsyncIterator[bytes]:
        assert self._local is not None
        chunks = self._local.stream(plan.body)
        first = await anext(chunks, None)
        return self._local_events(rec, chunks, first)

    async def _local_events(
        self,
        rec: RequestRecord,
        chunks: AsyncIterator[dict[str, Any]],
        chunk: dict[str, Any] | None,
    ) -> AsyncIterator[bytes]:
        failure: ApiError | None = None
        try:
            while chunk is not None:
                yield sse_event(chunk)
                chunk = await anext(chunks, None)
            await self._succeed(rec)
        except ApiError as err:
            failure = err
            await self._fail(rec, err)
        except Exception as exc:
            failure = await self._internal(rec, exc)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if not rec.finished:
                rec.outcome, rec.status = "client_disconnected", STATUS_CLIENT_GONE
                self._finish_now(rec)
        if failure is not None:
            yield sse_event(failure.body())
        yield SSE_DONE

    def _broker_refusal(self, rec: RequestRecord, exc: BrokerCallError) -> ApiError:
        """The error for the app; the broker's (or enclave's) reason goes into the audit."""
        rec.reason = f"{exc.code.name}: {(exc.details or '')[:_REASON_CHARS]}"
        log.warning("broker refused rid=%s status=%s", rec.request_id_hex, exc.code.name)
        return broker_error(exc)

    async def _prepare(
        self, rec: RequestRecord, plan: _Plan
    ) -> tuple[SealedRequest, list[TrustedKey]]:
        decision = plan.decision
        constraints = plan.constraints if plan.constraints is not None else self._constraints
        candidates = await self._candidates(rec.model, constraints)
        rec.enclaves = tuple((c.enclave_id, c.epoch, c.result.simulated) for c in candidates)
        meta = RequestMeta(
            suite=self._config.suite,
            request_id=rec.request_id,
            tenant=self._config.tenant,
            app=rec.app,
            model=rec.model,
            operation=rec.op,
            stream=rec.stream,
            policy_id=decision.policy_id,
            constraints=constraints,
            issued_at_ms=self._clock(),
            ttl_s=self._config.request_ttl_s,
            labels=decision.classes,
        )
        return seal(meta, plan.body, candidates, self._signing_key), candidates

    async def _candidates(
        self, model: str, constraints: Constraints | None = None
    ) -> list[TrustedKey]:
        """Verified candidates; refresh the directory once on demand when there are none."""
        error: BrokerCallError | None = None
        try:
            await self.refresh()
        except BrokerCallError as exc:
            error = exc
        found = self._pick(model, constraints)
        if not found and error is None:
            try:
                await self.refresh(force=True)
            except BrokerCallError as exc:
                error = exc
            found = self._pick(model, constraints)
        if found:
            return found
        if error is not None:
            raise ApiError(503, "enclaves_unavailable", f"cannot list enclaves: {error.details}")
        raise ApiError(
            503,
            "no_enclave_available",
            f"no enclave verified by this edge serves {model!r} within its constraints",
        )

    def _pick(self, model: str, constraints: Constraints | None = None) -> list[TrustedKey]:
        return self._trusted.candidates(
            model, self._config.candidates, constraints or self._constraints, kem=self._kem
        )

    async def refresh(self, *, force: bool = False) -> None:
        """Bring the trusted set up to the broker's directory (cached for refresh_s)."""
        listing = await self._broker.list_enclaves(force=force)
        if listing.generation != self._synced_generation:
            self._trusted.sync(listing.descriptors, broker_ear_key=listing.ear_verifier_key)
            self._synced_generation = listing.generation

    async def refresh_tolerant(self) -> None:
        """Refresh, but keep serving from the cached verified set if the broker is down."""
        try:
            await self.refresh()
        except BrokerCallError as exc:
            if self._synced_generation == 0:
                raise ApiError(
                    503, "enclaves_unavailable", f"cannot list enclaves: {exc.details}"
                ) from None
            log.warning("enclave directory refresh failed: %s", exc.code.name)

    async def models_for(self, app: AppConfig) -> list[str]:
        await self.refresh_tolerant()
        served = self._trusted.models(self._constraints, kem=self._kem)
        return self._policy.app_models(app, served)

    def _served_by(
        self, rec: RequestRecord, candidates: Sequence[TrustedKey], enclave_id: str
    ) -> None:
        # The frame itself proves a recipient answered; a broker naming anyone else is lying.
        if enclave_id not in {c.enclave_id for c in candidates}:
            raise ReplyIntegrityError("the broker named an enclave that was not a candidate")
        if rec.served_by not in (None, enclave_id):
            raise ReplyIntegrityError("the broker switched enclaves in the middle of a reply")
        rec.served_by = enclave_id

    # -- outcomes -------------------------------------------------------------------------------

    async def _succeed(self, rec: RequestRecord) -> None:
        rec.outcome, rec.status = "ok", 200
        await self._finish(rec)

    async def _fail(self, rec: RequestRecord, err: ApiError) -> None:
        rec.outcome, rec.status = err.code, err.status
        if isinstance(err, ReplyIntegrityError):
            rec.reason = err.reason
            log.warning(
                "reply integrity failure: rid=%s enclave=%s: %s",
                rec.request_id_hex,
                rec.served_by,
                err.reason,
            )
        await self._finish(rec)

    async def _internal(self, rec: RequestRecord, exc: Exception) -> ApiError:
        # Only the type: exception messages could quote request content.
        log.error("internal error: rid=%s: %s", rec.request_id_hex, type(exc).__name__)
        err = internal_error()
        await self._fail(rec, err)
        return err

    async def _finish(self, rec: RequestRecord) -> None:
        """Append the request's audit record and wait until it is on disk, without blocking the
        event loop (sovra/audit.py rule 6: concurrent requests share one commit). The record is
        written even if this wait is cancelled."""
        if rec.finished:
            return
        rec.finished = True
        await self._audit.append_async(AUDIT_KIND, rec.audit_record())

    def _finish_now(self, rec: RequestRecord) -> None:
        """:meth:`_finish`, blocking: for generators being closed, where awaiting is unsafe."""
        if rec.finished:
            return
        rec.finished = True
        self._audit.append(AUDIT_KIND, rec.audit_record())


def _cancel(call: StreamCall | None) -> None:
    if call is not None:
        call.cancel()
