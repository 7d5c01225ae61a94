"""`GET /v1/models`: the models that live workers serve on a realtime queue, in OpenAI's list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from producer.api.errors import ApiError
from producer.api.schemas import Model, ModelList, error_responses
from producer.api.state import ApiState, get_state
from producer.fleet import WorkerInfo, live_workers, serving

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503), summary="List the models that live workers serve")
def list_models(state: ApiState = Depends(get_state)) -> ModelList:
    """List each distinct CLIPFLEET_MODEL of the live workers that read a realtime queue, sorted by id."""
    return ModelList(data=served_models(live_workers(state.redis)))


@router.get(
    "/v1/models/{model_id:path}", response_model=Model, responses=error_responses(401, 404, 503), summary="Describe one served model"
)
def retrieve_model(model_id: str, state: ApiState = Depends(get_state)) -> Model:
    """Describe the model `model_id`: a CLIPFLEET_MODEL value or its last path component. 404 when no live worker serves it."""
    workers = live_workers(state.redis)
    models = served_models(serving(workers, model_id))
    if not models:
        raise ApiError(404, f"model {model_id!r} is not served: {served_list(workers)}", code="model_not_found", param="model")
    return models[0]


def served_models(workers: list[WorkerInfo]) -> list[Model]:
    """Return one Model per distinct model of the `workers` that read a realtime queue, sorted by id.

    `created` is the start time of the earliest-started of those workers.
    """
    started: dict[str, float] = {}
    for worker in workers:
        if worker.realtime_queue:
            started[worker.model] = min(worker.started_at, started.get(worker.model, worker.started_at))
    return [Model(id=model, created=int(started[model])) for model in sorted(started)]


def served_list(workers: list[WorkerInfo]) -> str:
    """Return a sentence listing the served models of `workers`, for error messages."""
    ids = [model.id for model in served_models(workers)]
    if not ids:
        return "no live worker serves realtime requests; start a worker whose CLIPFLEET_REALTIME_QUEUE is not empty"
    return "the served models are " + ", ".join(repr(model_id) for model_id in ids)
