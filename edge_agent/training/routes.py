"""HTTP routes for training (docs/training.md, "API"): native ``/v1/training/...`` and the
OpenAI-compatible ``/v1/fine_tuning/jobs`` shape.

Every route needs an app API key; an app sees and scores only its own jobs and models. Blocking
work (policy decisions over a dataset sample, scoring round trips) runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from edge_agent.config import AppConfig
from edge_agent.errors import ApiError
from edge_agent.training.service import TrainingError, TrainingService
from sovra.training import ALGORITHMS, TASKS

OPENAI_STATUS: Final = {
    "queued": "queued",
    "uploading": "running",
    "training": "running",
    "completed": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}

ReadJson = Callable[[Request, int], Awaitable[dict[str, Any]]]


def _api_error(exc: TrainingError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except TrainingError as exc:
        raise _api_error(exc) from None


def _string(body: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    value = body.get(key, default)
    if (required and key not in body) or not isinstance(value, str) or (required and not value):
        raise ApiError(
            400,
            "invalid_request",
            f"invalid request body: {key}: a non-empty string is required",
            param=key,
        )
    return value


def _params(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise ApiError(
            400,
            "invalid_request",
            "invalid request body: params: an object of numbers",
            param="params",
        )
    return value


def openai_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job in the shape of OpenAI's ``fine_tuning.job`` object."""
    error = job["error"] if job["state"] == "failed" else None
    return {
        "object": "fine_tuning.job",
        "id": job["id"],
        "model": job["base_model"],
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
        "fine_tuned_model": job["model"],
        "organization_id": job["app"],
        "result_files": [],
        "status": OPENAI_STATUS[job["state"]],
        "validation_file": None,
        "training_file": job["dataset"],
        "hyperparameters": job["params"],
        "trained_tokens": None,
        "error": error,
        "seed": job["params"].get("seed", 0),
        "method": {"type": "supervised"},
        "metadata": {
            "sovra_state": job["state"],
            "task": job["task"],
            "target": job["target"],
            "algorithm": job["algorithm"],
            "progress": str(job["progress"]["fraction"]),
        },
    }


def install(
    app: FastAPI,
    service: TrainingService,
    authenticated: Callable[[Request], AppConfig],
    read_json: ReadJson,
    limit: int,
) -> None:
    Auth = Depends(authenticated)

    async def create(request: Request, app_cfg: AppConfig, openai: bool) -> dict[str, Any]:
        body = await read_json(request, limit)
        if openai:
            dataset = _string(body, "training_file")
            base_model = _string(body, "model")
            params = _params(body.get("hyperparameters"))
        else:
            dataset = _string(body, "dataset")
            base_model = _string(body, "base_model", required=False) or _default_model(app_cfg)
            params = _params(body.get("params"))
        task = _string(body, "task", required=False, default="classification")
        if task not in TASKS:
            raise ApiError(
                400, "invalid_request", f"task must be one of {', '.join(TASKS)}", param="task"
            )
        algorithm = _string(body, "algorithm", required=False, default="logistic_regression")
        if algorithm not in ALGORITHMS:
            raise ApiError(
                400,
                "invalid_request",
                f"algorithm must be one of {', '.join(ALGORITHMS)}",
                param="algorithm",
            )
        job: dict[str, Any] = await _call(
            service.create_job,
            app=app_cfg.name,
            dataset=dataset,
            task=task,
            target=_string(body, "target"),
            algorithm=algorithm,
            params=params,
            base_model=base_model,
            text_column=_string(body, "text_column", required=False),
        )
        return job

    def _default_model(app_cfg: AppConfig) -> str:
        if app_cfg.models:
            return app_cfg.models[0]
        raise ApiError(
            400,
            "invalid_request",
            "base_model is required (the app has no models)",
            param="base_model",
        )

    # -- native --------------------------------------------------------------------------

    @app.post("/v1/training/jobs")
    async def create_job(request: Request, app_cfg: AppConfig = Auth) -> Any:
        return JSONResponse(await create(request, app_cfg, openai=False), status_code=201)

    @app.get("/v1/training/jobs")
    async def list_jobs(app_cfg: AppConfig = Auth) -> dict[str, Any]:
        jobs = await _call(service.jobs, app_cfg.name)
        return {"object": "list", "data": jobs}

    @app.get("/v1/training/jobs/{job_id}")
    async def get_job(job_id: str, app_cfg: AppConfig = Auth) -> dict[str, Any]:
        job: dict[str, Any] = await _call(service.job_view, job_id, app_cfg.name)
        return job

    @app.post("/v1/training/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, app_cfg: AppConfig = Auth) -> dict[str, Any]:
        job: dict[str, Any] = await _call(service.cancel, job_id, app_cfg.name)
        return job

    @app.get("/v1/training/jobs/{job_id}/receipt")
    async def get_receipt(
        job_id: str, verify: bool = False, app_cfg: AppConfig = Auth
    ) -> dict[str, Any]:
        if verify:
            report: dict[str, Any] = await _call(service.verify, job_id, app_cfg.name)
            return report
        receipt: dict[str, Any] = await _call(service.receipt, job_id, app_cfg.name)
        return receipt

    @app.post("/v1/training/models/{model}/score")
    async def score(model: str, request: Request, app_cfg: AppConfig = Auth) -> dict[str, Any]:
        body = await read_json(request, limit)
        records = body.get("records")
        if not isinstance(records, list) or not records:
            raise ApiError(
                400,
                "invalid_request",
                "invalid request body: records: a non-empty list",
                param="records",
            )
        result: dict[str, Any] = await _call(service.score, app_cfg.name, model, records)
        return result

    # -- OpenAI-compatible ---------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    async def ft_create(request: Request, app_cfg: AppConfig = Auth) -> dict[str, Any]:
        return openai_job(await create(request, app_cfg, openai=True))

    @app.get("/v1/fine_tuning/jobs")
    async def ft_list(app_cfg: AppConfig = Auth) -> dict[str, Any]:
        jobs = await _call(service.jobs, app_cfg.name)
        return {"object": "list", "data": [openai_job(j) for j in jobs], "has_more": False}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def ft_get(job_id: str, app_cfg: AppConfig = Auth) -> dict[str, Any]:
        return openai_job(await _call(service.job_view, job_id, app_cfg.name))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def ft_cancel(job_id: str, app_cfg: AppConfig = Auth) -> dict[str, Any]:
        return openai_job(await _call(service.cancel, job_id, app_cfg.name))


def model_objects(service: TrainingService, app: str) -> list[dict[str, Any]]:
    """Trained models of ``app`` as OpenAI model objects (for ``/v1/models``)."""
    return [
        {"id": m, "object": "model", "created": 0, "owned_by": "sovra-training"}
        for m in service.model_ids(app)
    ]
