"""Experiment tracking: a thin wrapper over MLflow's ``MlflowClient`` (no global active-run state).

Where runs go (``default_tracking_uri``): ``$ROADLOOP_TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``, else
the local SQLite store ``sqlite:///$ROADLOOP_HOME/mlflow.db`` (``ROADLOOP_HOME`` defaults to ``~/.roadloop``).
For any ``sqlite:///`` store, new experiments keep their artifacts in ``mlartifacts/`` next to the database
file (MLflow's own default would be ``./mlruns`` in whatever the current directory is).  Browse with
``mlflow ui --backend-store-uri sqlite:///$HOME/.roadloop/mlflow.db``.

``Tracker`` starts a run (or reattaches to one by id, for ``--resume``), logs flattened params, batched
metrics, tags and artifacts, and ends the run as FINISHED / FAILED / KILLED (also as a context manager).
``NullTracker`` (``Tracker.disabled()``) has the same interface and does nothing (tests, ``--no-track``).

Costs measured with MLflow 3.17 on a busy 2-core CPU box (one thread): ``import mlflow`` ~1.0-1.3 s (done
lazily, on the first real ``Tracker``); creating a fresh SQLite store (schema + alembic migrations) ~1.1-1.9 s;
opening an existing store in a new process ~0.8 s; later ``Tracker``s on the same URI in the same process
reuse MLflow's cached store (~30 ms to start a run); one ``log_metrics`` call (one ``log_batch`` = one
SQLite transaction) ~6 ms for 1 key, ~10 ms for 20 keys, ~40 ms for 200 keys: log every N steps rather than
every step when steps are fast.  Trackers may be used from several threads (one client per URI).

Behaviour worth knowing:

* Params: nested mappings / dataclasses are flattened with dots (``{"optim": {"lr": 1e-3}}`` ->
  ``optim.lr``), values are ``str()``-ed and truncated to MLflow's 6000-character limit, characters MLflow
  refuses in keys become ``_``.  Logging a param again with the same value is a no-op (so a resumed run can
  log its config again); a different value raises ``RoadloopError`` listing the conflicts.
* Metrics: non-finite values (NaN / inf) are not sent (MLflow charts break on them); each is counted in
  ``Tracker.nonfinite`` and recorded in the run tag ``roadloop.nonfinite.<key>`` = ``"<count> (last step
  <step>)"``, so they stay visible in the UI.
* Opening a SQLite store holds the file lock ``<db>.lock`` (``filelock``): the first process to open a new
  store creates its tables, and two runs started side by side on a fresh machine would otherwise both try.
* Store failures (corrupt or non-SQLite file at the path, locked database, unreachable server) raise
  ``RoadloopError`` naming the URI, never a raw SQLAlchemy traceback.  A locked SQLite database first
  waits for MLflow's 20 s busy timeout.
* Importing MLflow here sets ``MLFLOW_DISABLE_TELEMETRY=true`` unless the variable is already set
  (MLflow 3 otherwise starts a usage-telemetry client on import), raises alembic's and MLflow's SQL store
  loggers to WARNING and ``mlflow.store.db.utils`` to CRITICAL (it prints ``Creating initial MLflow database
  tables...`` on a new store and a full traceback for every database error, which we re-raise as a one-line
  ``RoadloopError``), and hides SQLAlchemy's ``noload`` deprecation warning raised from inside MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from roadloop.errors import RoadloopError
from roadloop.io import roadloop_home

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
STATUSES = ("FINISHED", "FAILED", "KILLED")

_lock = threading.Lock()
_clients: dict[str, Any] = {}
_quiet_done = False


def default_tracking_uri() -> str:
    """``$ROADLOOP_TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<ROADLOOP_HOME>/mlflow.db``."""
    for var in ("ROADLOOP_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        if os.environ.get(var):
            return os.environ[var]
    return f"sqlite:///{roadloop_home() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    p = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if p in ("", ":memory:") else Path(p)


def artifact_location_for(uri: str) -> str | None:
    """Artifact root for new experiments: ``mlartifacts/`` next to a SQLite database, else MLflow's choice."""
    db = _sqlite_path(uri)
    return (db.expanduser().resolve().parent / "mlartifacts").as_uri() if db is not None else None


# ---------------------------------------------------------------------------------------------
# MLflow access: lazy import, quiet logs, errors -> RoadloopError

def _import_mlflow():
    global _quiet_done
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # noqa: F401  (configures mlflow's loggers on import)
    from mlflow.tracking import MlflowClient

    if not _quiet_done:
        for name in ("mlflow.store.tracking.sqlalchemy_store", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # logs every SQLAlchemy error with a full traceback before re-raising it; we re-raise it as a
        # one-line RoadloopError instead
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        _quiet_done = True
    return MlflowClient


@contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        try:
            from sqlalchemy.exc import SADeprecationWarning

            warnings.filterwarnings("ignore", category=SADeprecationWarning)
        except ImportError:  # pragma: no cover - sqlalchemy is an mlflow dependency
            pass
        yield


def _store_error_types() -> tuple[type[BaseException], ...]:
    import sqlite3

    from mlflow.exceptions import MlflowException

    types: list[type[BaseException]] = [MlflowException, sqlite3.Error, OSError]
    try:
        from sqlalchemy.exc import SQLAlchemyError

        types.append(SQLAlchemyError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _describe(uri: str, what: str, e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if len(msg) > 300:
        msg = msg[:300] + "..."
    low = str(e).lower()
    hint = ""
    if "database is locked" in low or "database table is locked" in low:
        hint = " (another process holds a lock on the database; retry later or use another ROADLOOP_TRACKING_URI)"
    elif "not a database" in low or "malformed" in low or "file is encrypted" in low:
        hint = (" (the file is not a valid SQLite database: corrupt? move it away, or point ROADLOOP_TRACKING_URI "
                "elsewhere)")
    elif "unable to open database" in low:
        hint = " (cannot open the database file: check the path and its permissions)"
    return f"MLflow tracking store {uri}: {what} failed: {msg}{hint}"


@contextmanager
def _guard(uri: str, what: str):
    """Turn store / MLflow errors into RoadloopError naming the URI (programming errors pass through)."""
    try:
        yield
    except RoadloopError:
        raise
    except Exception as e:
        if isinstance(e, _store_error_types()):
            raise RoadloopError(_describe(uri, what, e)) from e
        raise


STORE_OPEN_TIMEOUT = 120.0  # s to wait for another process that is creating or migrating the same SQLite store


@contextmanager
def _store_open_lock(db: Path | None):
    """Hold ``<db>.lock`` (an OS file lock, ``filelock``) while opening a SQLite store; no-op for other stores."""
    if db is None:
        yield
        return
    from filelock import FileLock, Timeout

    path = db.expanduser().with_name(db.name + ".lock")
    try:
        with FileLock(str(path), timeout=STORE_OPEN_TIMEOUT):
            yield
    except Timeout:
        raise RoadloopError(f"MLflow tracking store sqlite:///{db}: another process held {path} for "
                            f"{STORE_OPEN_TIMEOUT:.0f} s while opening the store") from None
    except OSError as e:  # after Timeout, which is one
        raise RoadloopError(f"MLflow tracking store sqlite:///{db}: cannot create the lock file {path}: {e} (check "
                            f"the path and its permissions, or point ROADLOOP_TRACKING_URI elsewhere)") from None


def _client(uri: str):
    """One MlflowClient per URI per process (MLflow caches the SQLAlchemy store by URI as well)."""
    with _lock:
        c = _clients.get(uri)
        if c is not None:
            return c
        MlflowClient = _import_mlflow()
        db = _sqlite_path(uri)
        if db is not None:
            try:
                db.expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RoadloopError(f"MLflow tracking store {uri}: cannot create {db.parent}: {e}") from e
        # a new SQLite store is created (tables, migrations) by whichever process opens it first; two processes
        # doing that at once fail with "table ... already exists": opening is serialised by a lock file beside it
        with _store_open_lock(db), _quiet_warnings(), _guard(uri, "opening the store"):
            c = MlflowClient(tracking_uri=uri)
            # MlflowClient opens the store lazily in some configurations: touch it now so that a bad store
            # fails here, with one clear message.
            c.search_experiments(max_results=1)
        _clients[uri] = c
        return c


# ---------------------------------------------------------------------------------------------
# params

def flatten(d: Mapping | Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings / dataclass instances into ``{"a.b.c": value}``."""
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping) and len(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _key(k: str, what: str) -> str:
    k = _BAD_KEY_CHARS.sub("_", str(k))
    if not k or len(k) > MAX_KEY:
        raise RoadloopError(f"{what} key must have 1..{MAX_KEY} characters, got {len(k)}: {k[:60]!r}...")
    return k


def _str_value(v: Any, limit: int) -> str:
    s = str(dict(v)) if isinstance(v, Mapping) else str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


# ---------------------------------------------------------------------------------------------
# trackers

class Tracker:
    """One MLflow run.  ``Tracker(experiment, run_name)`` starts a run; ``Tracker(experiment, run_id=...)``
    reattaches to an existing one (status back to RUNNING).  Use as a context manager or call ``finish``."""

    enabled = True

    def __init__(self, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 uri: str | None = None, tags: dict | None = None):
        self._uri = uri or default_tracking_uri()
        self._client = _client(self._uri)
        self._finished = False
        self.nonfinite: dict[str, int] = {}
        tags = {str(k): _str_value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}
        if run_id is not None:
            self._attach(experiment, run_id, tags)
        else:
            self._experiment_id = self._get_or_create_experiment(experiment)
            with _guard(self._uri, f"creating a run in experiment '{experiment}'"):
                run = self._client.create_run(self._experiment_id, run_name=run_name, tags=tags)
            self._run_id = run.info.run_id
            self.run_name = run.info.run_name
            self.resumed = False

    @staticmethod
    def disabled() -> NullTracker:
        return NullTracker()

    # ---------------------------------------------------------------- setup
    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        with _guard(self._uri, f"looking up experiment '{name}'"):
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return self._client.create_experiment(name, artifact_location=artifact_location_for(self._uri))
                except MlflowException as e:  # created concurrently by another tracker / process
                    if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self._client.get_experiment_by_name(name)
                    if exp is None:
                        raise
        if exp.lifecycle_stage != "active":
            raise RoadloopError(f"MLflow experiment '{name}' (id {exp.experiment_id}) in {self._uri} is deleted; "
                                f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                                f"or use another experiment name")
        return exp.experiment_id

    def _attach(self, experiment: str, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            with _quiet_warnings():
                run = self._client.get_run(run_id)
        except MlflowException as e:
            if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                raise RoadloopError(f"no MLflow run with id '{run_id}' in {self._uri} (cannot resume it)") from e
            raise RoadloopError(_describe(self._uri, f"looking up run '{run_id}'", e)) from e
        except Exception as e:
            if isinstance(e, _store_error_types()):
                raise RoadloopError(_describe(self._uri, f"looking up run '{run_id}'", e)) from e
            raise
        if run.info.lifecycle_stage != "active":
            raise RoadloopError(f"MLflow run '{run_id}' in {self._uri} is deleted (cannot resume it)")
        with _guard(self._uri, f"resuming run '{run_id}'"):
            exp = self._client.get_experiment(run.info.experiment_id)
            if exp.name != experiment:
                raise RoadloopError(f"MLflow run '{run_id}' belongs to experiment '{exp.name}', not '{experiment}'")
            n = int(run.data.tags.get("roadloop.resume_count", "0")) + 1
            self._client.update_run(run_id, status="RUNNING")
            self._set_tags({**tags, "roadloop.resume_count": str(n)}, run_id)
        self._experiment_id = run.info.experiment_id
        self._run_id = run_id
        self.run_name = run.info.run_name
        self.resumed = True

    # ---------------------------------------------------------------- properties
    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def artifact_uri(self) -> str:
        with _guard(self._uri, "reading the run's artifact URI"):
            return self._client.get_run(self._run_id).info.artifact_uri

    # ---------------------------------------------------------------- logging
    def params(self) -> dict[str, str]:
        """The params logged on this run so far (from the store)."""
        with _guard(self._uri, f"reading params of run '{self._run_id}'"):
            return dict(self._client.get_run(self._run_id).data.params)

    def log_params(self, params: Mapping | Any) -> None:
        """Log (nested) params; see the module docstring for flattening, truncation and conflicts."""
        from mlflow.entities import Param

        flat = {_key(k, "param"): _str_value(v, MAX_PARAM_VALUE) for k, v in flatten(params).items()}
        old = self.params()
        conflicts = {k: (old[k], v) for k, v in flat.items() if k in old and old[k] != v}
        if conflicts:
            shown = "; ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in sorted(conflicts.items())[:10])
            more = f" (and {len(conflicts) - 10} more)" if len(conflicts) > 10 else ""
            raise RoadloopError(f"MLflow run '{self._run_id}' already has different value(s) for param(s) {shown}{more}"
                                f"; MLflow params are immutable: start a new run or keep the resumed run's config")
        new = [Param(k, v) for k, v in flat.items() if k not in old]
        with _guard(self._uri, f"logging params to run '{self._run_id}'"):
            for chunk in _chunks(new, _PARAMS_PER_BATCH):
                self._client.log_batch(self._run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` in one ``log_batch``; non-finite values are counted, not sent."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch, bad = [], []
        for k, v in metrics.items():
            key = _key(k, "metric")
            try:
                x = float(v)
            except (TypeError, ValueError) as e:
                raise RoadloopError(f"metric '{k}' must be a number, got {type(v).__name__}: {v!r:.60}") from e
            if math.isfinite(x):
                batch.append(Metric(key, x, ts, int(step)))
            else:
                bad.append(key)
        with _guard(self._uri, f"logging metrics to run '{self._run_id}'"):
            for chunk in _chunks(batch, _METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=chunk)
        if bad:
            for k in bad:
                self.nonfinite[k] = self.nonfinite.get(k, 0) + 1
            self._set_tags({f"roadloop.nonfinite.{k}": f"{self.nonfinite[k]} (last step {int(step)})" for k in bad})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or a whole directory's contents) into the run's artifacts."""
        p = Path(path)
        if not p.exists():
            raise RoadloopError(f"cannot log artifact {p}: no such file or directory")
        with _guard(self._uri, f"logging artifact {p} to run '{self._run_id}'"):
            if p.is_dir():
                self._client.log_artifacts(self._run_id, str(p), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(p), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._set_tags({str(k): v for k, v in tags.items()})

    def _set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        run_id = run_id or self._run_id
        items = [RunTag(_key(k, "tag"), _str_value(v, MAX_TAG_VALUE)) for k, v in tags.items()]
        with _guard(self._uri, f"setting tags on run '{run_id}'"):
            for chunk in _chunks(items, _PARAMS_PER_BATCH):
                self._client.log_batch(run_id, tags=chunk)

    # ---------------------------------------------------------------- end
    def finish(self, status: str = "FINISHED") -> None:
        """End the run (idempotent: later calls do nothing)."""
        if status not in STATUSES:
            raise RoadloopError(f"run status must be one of {', '.join(STATUSES)}, got '{status}'")
        if self._finished:
            return
        with _guard(self._uri, f"ending run '{self._run_id}'"):
            self._client.set_terminated(self._run_id, status)
        self._finished = True

    @property
    def finished(self) -> bool:
        return self._finished

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            try:
                self.finish(status)
            except RoadloopError as e:  # do not mask the original exception
                warnings.warn(f"could not mark the run {status}: {e}", stacklevel=2)

    def __repr__(self) -> str:
        return f"Tracker(run_id={self._run_id!r}, experiment_id={self._experiment_id!r}, uri={self._uri!r})"


class NullTracker:
    """Same interface as ``Tracker``; records nothing (``--no-track``, tests)."""

    enabled = False
    run_id = None
    uri = None
    experiment_id = None
    artifact_uri = None
    run_name = None
    resumed = False

    def __init__(self, *args, **kwargs):
        self.nonfinite: dict[str, int] = {}
        self._finished = False

    @staticmethod
    def disabled() -> NullTracker:
        return NullTracker()

    def params(self) -> dict[str, str]:
        return {}

    def log_params(self, params: Mapping | Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise RoadloopError(f"run status must be one of {', '.join(STATUSES)}, got '{status}'")
        self._finished = True

    @property
    def finished(self) -> bool:
        return self._finished

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    def __repr__(self) -> str:
        return "NullTracker()"


def read_metrics(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """A metric's history as ``[(step, value), ...]`` sorted by step (then logging time)."""
    uri = uri or default_tracking_uri()
    client = _client(uri)
    with _guard(uri, f"reading metric '{key}' of run '{run_id}'"):
        hist = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def run_status(run_id: str, uri: str | None = None) -> str:
    """The run's status (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``)."""
    uri = uri or default_tracking_uri()
    with _guard(uri, f"reading run '{run_id}'"):
        return _client(uri).get_run(run_id).info.status


__all__ = ["NullTracker", "Tracker", "artifact_location_for", "default_tracking_uri", "flatten", "read_metrics",
           "roadloop_home", "run_status"]
