"""Fitting and scoring models inside the enclave (scikit-learn), with hold-out metrics.

``train`` reads the transformed dataset (CSV) from a stream, splits off a hold-out set, fits the
chosen algorithm, computes the hold-out metrics and returns the fitted model as an artifact
(pickle bytes; see docs/training.md for the trust model). ``score`` loads an artifact and
predicts. Errors are :class:`TrainingError` with messages that never quote data values.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

ARTIFACT_FORMAT: Final = "sovra-model/1"
TRAIN_EXTRA_HINT: Final = "pip install 'sovra[train]' (scikit-learn, pandas, pyarrow)"
MAX_CATEGORIES: Final = 50
EMBED_BATCH: Final = 32
MAX_SCORE_RECORDS: Final = 10_000

Embedder = Callable[[list[str]], list[list[float]]]

_COMMON: Final = {"test_size": (float, 0.25), "seed": (int, 0)}
_PARAMS: Final[dict[str, dict[str, tuple[type, Any]]]] = {
    "logistic_regression": {**_COMMON, "C": (float, 1.0), "max_iter": (int, 1000)},
    "gradient_boosting": {
        **_COMMON,
        "learning_rate": (float, 0.1),
        "max_iter": (int, 100),
        "max_leaf_nodes": (int, 31),
        "max_depth": (int, 0),  # 0: no limit
    },
    "text_embedding_classifier": {**_COMMON, "C": (float, 1.0), "max_iter": (int, 1000)},
}


class TrainingError(Exception):
    """A job or scoring request that cannot be served; the message is safe to send back."""

    def __init__(self, message: str, code: str = "training_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class TrainResult:
    artifact: bytes = field(repr=False)
    metrics: dict[str, float]
    holdout: dict[str, Any]
    params: dict[str, Any]
    rows: int


def effective_params(algorithm: str, params: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; TrainingError for an unknown parameter or a wrong type or range."""
    allowed = _PARAMS.get(algorithm)
    if allowed is None:
        raise TrainingError(f"unknown algorithm {algorithm!r}", "invalid_algorithm")
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in allowed:
            names = ", ".join(sorted(allowed))
            raise TrainingError(
                f"unknown parameter {name!r} for {algorithm} (allowed: {names})",
                "invalid_parameter",
            )
        kind = allowed[name][0]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok:
            raise TrainingError(
                f"parameter {name!r} must be a {kind.__name__}", "invalid_parameter"
            )
        out[name] = kind(value)
    for name, (_kind, default) in allowed.items():
        out.setdefault(name, default)
    if not 0.05 <= out["test_size"] <= 0.5:
        raise TrainingError("parameter 'test_size' must be from 0.05 to 0.5", "invalid_parameter")
    for name in ("C", "learning_rate"):
        if name in out and out[name] <= 0:
            raise TrainingError(f"parameter {name!r} must be positive", "invalid_parameter")
    for name in ("max_iter", "max_leaf_nodes"):
        if name in out and not 1 <= out[name] <= 100_000:
            raise TrainingError(f"parameter {name!r} must be from 1 to 100000", "invalid_parameter")
    return out


def _libs() -> tuple[Any, Any]:
    try:
        import numpy
        import pandas
    except ImportError:
        raise TrainingError(
            f"this enclave cannot train: {TRAIN_EXTRA_HINT}", "unavailable"
        ) from None
    return numpy, pandas


def train(
    *,
    algorithm: str,
    task: str,
    target: str,
    params: dict[str, Any],
    data: io.RawIOBase | io.BufferedIOBase,
    text_column: str = "",
    embedder: Embedder | None = None,
    embedding_model: str = "",
) -> TrainResult:
    p = effective_params(algorithm, params)
    if algorithm == "logistic_regression" and task != "classification":
        raise TrainingError(
            "logistic_regression is a classifier; use gradient_boosting for regression",
            "invalid_algorithm",
        )
    if algorithm == "text_embedding_classifier":
        if task != "classification":
            raise TrainingError("text_embedding_classifier is a classifier", "invalid_algorithm")
        if embedder is None:
            raise TrainingError(
                "text_embedding_classifier needs the enclave's LLM runtime (llama workload) "
                "for embeddings; this enclave has none",
                "embeddings_unavailable",
            )
    np, pd = _libs()
    try:
        frame = pd.read_csv(data, low_memory=False)
    except Exception:
        raise TrainingError(
            "the transformed dataset is not readable CSV", "invalid_dataset"
        ) from None
    if target not in frame.columns:
        raise TrainingError(f"target column {target!r} is not in the dataset", "invalid_target")
    frame = frame[frame[target].notna()]
    if len(frame) < 10:
        raise TrainingError("the dataset has fewer than 10 rows with a target value", "too_small")
    y = frame[target]
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(y):
            raise TrainingError(f"regression target {target!r} is not numeric", "invalid_target")
    elif y.nunique() < 2:
        raise TrainingError("classification needs at least two target classes", "invalid_target")
    X, layout = _features(frame.drop(columns=[target]), algorithm, text_column, pd)
    from sklearn.model_selection import train_test_split

    stratify = y if task == "classification" and y.value_counts().min() >= 2 else None
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=p["test_size"], random_state=p["seed"], stratify=stratify
    )
    estimator = _estimator(algorithm, task, p, layout, embedder)
    try:
        estimator.fit(X_train, y_train)
    except TrainingError:
        raise
    except Exception as exc:
        # sklearn's messages may quote values; name only the kind of failure.
        raise TrainingError(f"fitting failed ({type(exc).__name__})", "fit_failed") from None
    metrics = _metrics(estimator, task, X_test, y_test, np)
    classes = [_plain(c) for c in getattr(estimator, "classes_", [])]
    model = {
        "format": ARTIFACT_FORMAT,
        "algorithm": algorithm,
        "task": task,
        "target": target,
        "features": layout["features"],
        "numeric": layout["numeric"],
        "categorical": layout["categorical"],
        "text_column": layout["text"],
        "classes": classes,
        "embedding_model": embedding_model if algorithm == "text_embedding_classifier" else "",
        "estimator": _strip_embedder(estimator),
    }
    artifact = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    import sklearn

    effective = {
        **p,
        "features_numeric": layout["numeric"],
        "features_categorical": layout["categorical"],
        "features_dropped": layout["dropped"],
        "text_column": layout["text"],
        "estimator": _describe(estimator),
        "sklearn": sklearn.__version__,
    }
    holdout = {
        "fraction": p["test_size"],
        "seed": p["seed"],
        "train_rows": len(X_train),
        "test_rows": len(X_test),
        "stratified": stratify is not None,
    }
    return TrainResult(artifact, metrics, holdout, effective, len(frame))


def _features(frame: Any, algorithm: str, text_column: str, pd: Any) -> tuple[Any, dict[str, Any]]:
    if algorithm == "text_embedding_classifier":
        column = text_column or _single_text_column(frame, pd)
        if column not in frame.columns:
            raise TrainingError(f"text column {column!r} is not in the dataset", "invalid_column")
        texts = frame[column].fillna("").astype(str)
        layout = {"features": [column], "numeric": [], "categorical": [], "text": column,
                  "dropped": [c for c in frame.columns if c != column]}  # fmt: skip
        return texts.to_frame(), layout
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    categorical = [
        c for c in frame.columns if c not in numeric and frame[c].nunique() <= MAX_CATEGORIES
    ]
    dropped = [c for c in frame.columns if c not in numeric and c not in categorical]
    if not numeric and not categorical:
        raise TrainingError("no usable feature columns (numeric or low-cardinality)", "no_features")
    layout = {"features": numeric + categorical, "numeric": numeric, "categorical": categorical,
              "text": "", "dropped": dropped}  # fmt: skip
    return frame[numeric + categorical], layout


def _single_text_column(frame: Any, pd: Any) -> str:
    texts = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if len(texts) != 1:
        raise TrainingError(
            "set the 'text_column' parameter: the dataset has "
            f"{len(texts)} text columns besides the target",
            "invalid_column",
        )
    return str(texts[0])


def _estimator(
    algorithm: str, task: str, p: dict[str, Any], layout: dict[str, Any], embedder: Embedder | None
) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if algorithm == "text_embedding_classifier":
        assert embedder is not None
        return Pipeline(
            [
                ("embed", _Embed(layout["text"], embedder)),
                ("scale", StandardScaler()),
                ("clf", LogisticRegression(C=p["C"], max_iter=p["max_iter"])),
            ]
        )
    parts = []
    if layout["numeric"]:
        numeric = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
        parts.append(("numeric", numeric, layout["numeric"]))
    if layout["categorical"]:
        categorical = make_pipeline(
            SimpleImputer(strategy="constant", fill_value="(missing)"),
            OneHotEncoder(handle_unknown="ignore"),
        )
        parts.append(("categorical", categorical, layout["categorical"]))
    prep = ColumnTransformer(parts, sparse_threshold=0.0)
    if algorithm == "logistic_regression":
        model: Any = LogisticRegression(C=p["C"], max_iter=p["max_iter"])
    else:
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        cls = (
            HistGradientBoostingClassifier
            if task == "classification"
            else HistGradientBoostingRegressor
        )
        model = cls(
            learning_rate=p["learning_rate"],
            max_iter=p["max_iter"],
            max_leaf_nodes=p["max_leaf_nodes"],
            max_depth=p["max_depth"] or None,
            random_state=p["seed"],
        )
    return Pipeline([("prep", prep), ("model", model)])


class _Embed:
    """A scikit-learn transformer mapping a text column to LLM embeddings (enclave-local)."""

    def __init__(self, column: str, embedder: Embedder | None) -> None:
        self.column = column
        self.embedder = embedder

    def fit(self, X: Any, y: Any = None) -> _Embed:
        return self

    def transform(self, X: Any) -> Any:
        import numpy as np

        if self.embedder is None:
            raise TrainingError(
                "this model needs the enclave's LLM runtime for embeddings; this enclave has none",
                "embeddings_unavailable",
            )
        texts = [str(t) for t in X[self.column].tolist()]
        vectors: list[list[float]] = []
        for start in range(0, len(texts), EMBED_BATCH):
            vectors.extend(self.embedder(texts[start : start + EMBED_BATCH]))
        return np.asarray(vectors, dtype=float)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"column": self.column, "embedder": self.embedder}

    def set_params(self, **params: Any) -> _Embed:
        for key, value in params.items():
            setattr(self, key, value)
        return self


def _strip_embedder(estimator: Any) -> Any:
    """The embedder is the enclave's runtime, not part of the model: never pickle it."""
    steps = getattr(estimator, "named_steps", {})
    embed = steps.get("embed") if isinstance(steps, dict) or hasattr(steps, "get") else None
    if isinstance(embed, _Embed):
        embed.embedder = None
    return estimator


def _metrics(estimator: Any, task: str, X_test: Any, y_test: Any, np: Any) -> dict[str, float]:
    from sklearn import metrics

    predicted = estimator.predict(X_test)
    if task == "regression":
        return {
            "r2": float(metrics.r2_score(y_test, predicted)),
            "mae": float(metrics.mean_absolute_error(y_test, predicted)),
            "rmse": float(np.sqrt(metrics.mean_squared_error(y_test, predicted))),
        }
    out = {"accuracy": float(metrics.accuracy_score(y_test, predicted))}
    classes = list(estimator.classes_)
    if len(set(y_test)) >= 2 and hasattr(estimator, "predict_proba"):
        proba = estimator.predict_proba(X_test)
        if len(classes) == 2:
            out["roc_auc"] = float(metrics.roc_auc_score(y_test == classes[1], proba[:, 1]))
        elif len(set(y_test)) == len(classes):
            out["roc_auc"] = float(
                metrics.roc_auc_score(y_test, proba, multi_class="ovr", labels=classes)
            )
    return out


def _describe(estimator: Any) -> dict[str, Any]:
    final = estimator.steps[-1][1]
    params = {
        k: _plain(v)
        for k, v in sorted(final.get_params(deep=False).items())
        if isinstance(v, int | float | str | bool) or v is None
    }
    return {"class": f"{type(final).__module__}.{type(final).__name__}", "params": params}


def _plain(value: Any) -> Any:
    """numpy scalars → Python scalars (for CBOR/JSON)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def load_artifact(artifact: bytes) -> dict[str, Any]:
    """Unpickle an artifact. Only ever called on artifacts that authenticated under their key."""
    try:
        model = pickle.loads(artifact)  # noqa: S301 - authenticated artifact, see docs/training.md
    except Exception:
        raise TrainingError("the model artifact does not load", "invalid_artifact") from None
    if not isinstance(model, dict) or model.get("format") != ARTIFACT_FORMAT:
        raise TrainingError(
            "the model artifact is not a sovra-model/1 artifact", "invalid_artifact"
        )
    return model


def score(
    artifact: bytes, records: Sequence[Any], embedder: Embedder | None = None
) -> dict[str, Any]:
    """Predictions (and class probabilities for classifiers) for ``records`` (column → value)."""
    _np, pd = _libs()
    if not isinstance(records, list | tuple) or not records:
        raise TrainingError("'records' must be a non-empty list of objects", "invalid_records")
    if len(records) > MAX_SCORE_RECORDS:
        raise TrainingError(f"at most {MAX_SCORE_RECORDS} records per request", "too_many_records")
    if not all(isinstance(r, dict) for r in records):
        raise TrainingError("each record must be an object of column values", "invalid_records")
    model = load_artifact(artifact)
    estimator = model["estimator"]
    if model["algorithm"] == "text_embedding_classifier":
        embed = estimator.named_steps["embed"]
        embed.embedder = embedder
    frame = pd.DataFrame.from_records(list(records))
    for column in model["features"]:
        if column not in frame.columns:
            frame[column] = None
    frame = frame[model["features"]]
    for column in model["numeric"]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in model["categorical"]:
        frame[column] = frame[column].astype(object)
    try:
        predicted = estimator.predict(frame)
        out: dict[str, Any] = {"predictions": [_plain(v) for v in predicted]}
        if model["task"] == "classification" and hasattr(estimator, "predict_proba"):
            proba = estimator.predict_proba(frame)
            out["classes"] = model["classes"]
            out["probabilities"] = [[round(float(x), 6) for x in row] for row in proba]
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"scoring failed ({type(exc).__name__})", "score_failed") from None
    out["model"] = {
        "algorithm": model["algorithm"],
        "task": model["task"],
        "target": model["target"],
    }
    return out
