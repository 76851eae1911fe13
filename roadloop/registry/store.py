"""The model registry: MLflow's model registry for versions and artifacts, roadloop's own SQLite tables for
the champion pointer, gate results, evaluations and the audit log (design in docs/registry.md).

Split of responsibilities, and why:

* **MLflow** (``$ROADLOOP_TRACKING_URI`` / ``$MLFLOW_TRACKING_URI`` / ``sqlite:///$ROADLOOP_HOME/mlflow.db``)
  holds the registered model, one *model version* per registered checkpoint (tags: weights / manifest hashes,
  trainer, training run, git commit) and the artifacts: each registration logs the checkpoint, its
  ``lineage.json``, the evaluation reports given with it and ``manifest.json`` into a run of the
  ``roadloop-registry`` experiment; the model version's source is that folder.  Any MLflow store works
  (team server, remote artifact store): non-local artifacts are downloaded to
  ``$ROADLOOP_CACHE/registry/`` and verified before use.  The alias ``champion`` mirrors the champion.
* **The state database** (SQLite: ``$ROADLOOP_REGISTRY_DB``, else ``registry.db`` next to a SQLite MLflow
  store, else ``$ROADLOOP_HOME/registry.db``) is authoritative for which versions roadloop registered
  (with the manifest hash), the champion history, gate results, evaluations and the audit log.  MLflow's
  registry calls cannot join a transaction with anything else, so every roadloop state change is ONE
  transaction on this database (``BEGIN IMMEDIATE``: writers serialise; a writer that cannot get the lock
  within ``lock_timeout`` fails with ``RegistryLockedError`` and changes nothing).  Every table is
  append-only (SQLite triggers abort UPDATE and DELETE); the current champion is the last row of
  ``champions``; the audit log is also hash-chained (``verify_audit``).
* Ordering: artifacts and the MLflow version are written first, the state row last; if the state
  transaction fails the MLflow version is deleted again, and an MLflow version without a state row (a
  process killed in between) is ignored by roadloop.  The MLflow alias is updated after the state
  transaction commits and re-synchronised by ``sync_alias`` (``registry list --sync``).

Entry points: ``Registry`` (``register``, ``versions``, ``resolve``, ``champion``, ``gate``, ``promote``,
``rollback``, ``audit``, ``load_policy``), ``register_candidate`` for trainers, ``resolve_policy`` for
``get_policy('champion')``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from roadloop.errors import RoadloopError
from roadloop.eval.evaluate import EvalReport, report_from_json
from roadloop.io import atomic_write_text, json_clean, sha256_file
from roadloop.registry.errors import (
    ConcurrentChangeError,
    GateFailedError,
    IntegrityError,
    RegistryDatabaseError,
    RegistryError,
    RegistryLockedError,
    StaleGateReportError,
    UnknownModelError,
)
from roadloop.registry.gates import GateConfig, GateSummary, load_gate_config, run_gates
from roadloop.registry.lineage import LINEAGE, actor, build_lineage, canonical_sha256, verify_manifest, write_manifest

DEFAULT_NAME = "roadloop-vla"
CHAMPION = "champion"
EXPERIMENT = "roadloop-registry"
GATE_REPORT_FORMAT = "roadloop-gate-report/1"
SCHEMA_VERSION = "1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_APPEND_ONLY = ("model_versions", "evaluations", "gate_runs", "champions", "audit_log")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, registered_at REAL NOT NULL, actor TEXT NOT NULL,
    reason TEXT NOT NULL, source TEXT NOT NULL, run_id TEXT NOT NULL, manifest_sha256 TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL, lineage TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    matrix_key TEXT NOT NULL, uri TEXT NOT NULL, sha256 TEXT NOT NULL, summary TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gate_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, name TEXT NOT NULL,
    candidate INTEGER NOT NULL, champion INTEGER, passed INTEGER NOT NULL, config_sha256 TEXT NOT NULL,
    matrix_key TEXT NOT NULL, eval_code TEXT NOT NULL, results TEXT NOT NULL, uri TEXT NOT NULL,
    sha256 TEXT NOT NULL, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS champions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, replaced INTEGER, restore_id INTEGER, action TEXT NOT NULL, forced INTEGER NOT NULL,
    gate_run INTEGER, envelope TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, at_iso TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, name TEXT NOT NULL, version INTEGER, reason TEXT NOT NULL, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS champions_by_name ON champions (name, id);
CREATE INDEX IF NOT EXISTS gate_runs_by_candidate ON gate_runs (name, candidate, id);
CREATE INDEX IF NOT EXISTS evaluations_by_version ON evaluations (name, version, matrix_key, id);
""" + "".join(f"""
CREATE TRIGGER IF NOT EXISTS {t}_no_update BEFORE UPDATE ON {t}
BEGIN SELECT RAISE(ABORT, '{t} is append-only: rows cannot be updated'); END;
CREATE TRIGGER IF NOT EXISTS {t}_no_delete BEFORE DELETE ON {t}
BEGIN SELECT RAISE(ABORT, '{t} is append-only: rows cannot be deleted'); END;
""" for t in _APPEND_ONLY)


# ---------------------------------------------------------------------------------------------
# records

@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    registered_at: float
    actor: str
    reason: str
    source: str  # artifact URI of the version's folder
    run_id: str  # the MLflow registration run holding the artifacts
    manifest_sha256: str
    weights_sha256: str
    lineage: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ChampionChange:
    id: int
    at: float
    actor: str
    name: str
    version: int
    replaced: int | None
    restore_id: int | None  # the champions row a rollback returns to
    action: str  # promote / rollback
    forced: bool
    gate_run: int | None
    envelope: dict
    reason: str


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    at_iso: str
    actor: str
    action: str
    name: str
    version: int | None
    reason: str
    details: dict


@dataclass
class GateRun:
    """One application of the gates to a candidate (recorded when ``id`` is set)."""

    created_at: float
    actor: str
    candidate: dict  # name, version, manifest_sha256, weights_sha256 (or checkpoint + weights for a folder)
    champion: dict | None
    config: dict
    config_sha256: str
    matrix_key: str
    eval_code: str
    summary: GateSummary
    candidate_report: EvalReport | None = None
    champion_report: EvalReport | None = None
    id: int | None = None
    uri: str | None = None
    origin: str = "gate"  # gate / file (a report given to promote)
    reused: bool = False  # promote found this recorded run instead of running the gates

    @property
    def passed(self) -> bool:
        return self.summary.passed

    def to_json(self) -> dict:
        """The gate report file (``roadloop gate --json``, ``promote --gate-report``)."""
        return json_clean({
            "format": GATE_REPORT_FORMAT, "created_at": self.created_at, "actor": self.actor,
            "candidate": self.candidate, "champion": self.champion, "config": self.config,
            "config_sha256": self.config_sha256, "matrix_key": self.matrix_key, "eval_code": self.eval_code,
            "passed": self.passed, "gates": self.summary.to_json(),
            "candidate_report": self.candidate_report.to_json() if self.candidate_report else None,
            "champion_report": self.champion_report.to_json() if self.champion_report else None,
        })


@dataclass
class Promotion:
    change: ChampionChange
    gate_run: GateRun | None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# references

def parse_ref(ref: str | int, default_name: str = DEFAULT_NAME) -> tuple[str, int | str]:
    """``"champion"``, ``"NAME@champion"``, ``"NAME@3"`` / ``"NAME@v3"`` / ``"NAME/3"``, ``"3"`` / ``"v3"``
    -> (name, version or "champion")."""
    if isinstance(ref, int):
        return default_name, ref
    s = str(ref).strip()
    name, sel = default_name, s
    for sep in ("@", "/"):
        if sep in s:
            name, sel = s.rsplit(sep, 1)
            break
    sel = sel.strip()
    if sel.lower() == CHAMPION:
        return name, CHAMPION
    m = re.fullmatch(r"[vV]?(\d+)", sel)
    if not m or not name:
        raise UnknownModelError(f"bad model reference '{ref}': use NAME@VERSION (e.g. {DEFAULT_NAME}@3), "
                                f"NAME@champion, a version number, or 'champion'")
    return name, int(m.group(1))


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise RegistryError(f"model name '{name}' must start with a letter or digit and contain only letters, "
                            f"digits, '_', '.' and '-' (at most 100 characters)")
    return name


def default_db_path(uri: str) -> Path:
    """``$ROADLOOP_REGISTRY_DB``, else ``registry.db`` next to a SQLite MLflow store, else
    ``$ROADLOOP_HOME/registry.db``."""
    from roadloop.train.tracking import _sqlite_path, roadloop_home

    if os.environ.get("ROADLOOP_REGISTRY_DB"):
        return Path(os.environ["ROADLOOP_REGISTRY_DB"]).expanduser().resolve()
    db = _sqlite_path(uri)
    if db is not None:
        return db.expanduser().resolve().parent / "registry.db"
    return roadloop_home() / "registry.db"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


# ---------------------------------------------------------------------------------------------
# the state database

class _StateDB:
    """SQLite access: one connection per operation, ``BEGIN IMMEDIATE`` for writes, errors -> RegistryError."""

    def __init__(self, path: Path, timeout: float):
        self.path = Path(path)
        self.timeout = float(timeout)
        self._ready = False

    def _err(self, e: BaseException, what: str) -> RegistryError:
        low = str(e).lower()
        p = self.path
        if "locked" in low or "busy" in low:
            return RegistryLockedError(f"registry database {p} is locked by another process (waited "
                                       f"{self.timeout:g} s) while {what}; nothing was changed: retry later")
        if "not a database" in low or "malformed" in low or "encrypted" in low:
            return RegistryDatabaseError(f"registry database {p} is not a valid SQLite database (corrupt?) while "
                                         f"{what}; nothing was changed: restore it from a backup or point "
                                         f"ROADLOOP_REGISTRY_DB elsewhere")
        if "append-only" in low:
            return RegistryError(f"registry database {p}: {e} ({what})")
        if "unable to open" in low or isinstance(e, OSError):
            return RegistryDatabaseError(f"registry database {p}: cannot open it while {what} ({e}): check the path "
                                         f"and its permissions")
        return RegistryDatabaseError(f"registry database {p}: {what} failed: {e}")

    def _connect(self, what: str) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            c = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            raise self._err(e, what) from e
        c.row_factory = sqlite3.Row
        return c

    def _ensure(self) -> None:
        if self._ready:
            return
        c = self._connect("opening")
        try:
            try:
                row = c.execute("SELECT value FROM schema_info WHERE key = 'version'").fetchone()
            except sqlite3.OperationalError as e:
                if "no such table" not in str(e).lower():
                    raise
                row = None
            if row is None:
                c.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in _split_sql(_SCHEMA):
                        c.execute(stmt)
                    c.execute("INSERT OR IGNORE INTO schema_info VALUES ('version', ?)", (SCHEMA_VERSION,))
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
            elif row["value"] != SCHEMA_VERSION:
                raise RegistryDatabaseError(f"registry database {self.path} has schema version {row['value']}, this "
                                            f"code knows {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise self._err(e, "opening") from e
        finally:
            c.close()
        self._ready = True

    @contextmanager
    def read(self, what: str) -> Iterator[sqlite3.Connection]:
        self._ensure()
        c = self._connect(what)
        try:
            yield c
        except sqlite3.Error as e:
            raise self._err(e, what) from e
        finally:
            c.close()

    @contextmanager
    def write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One transaction: committed if the block completes, rolled back on any exception."""
        self._ensure()
        c = self._connect(what)
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            c.close()
            raise self._err(e, what) from e
        try:
            yield c
            c.execute("COMMIT")
        except BaseException as e:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, sqlite3.Error):
                raise self._err(e, what) from e
            raise
        finally:
            c.close()


class _Duplicate(Exception):
    """Internal: the weights were registered concurrently (the transaction is rolled back)."""


def _split_sql(script: str) -> list[str]:
    """Statements of ``script`` (triggers keep their ``BEGIN ... END;`` body)."""
    out, cur = [], []
    for line in script.strip().splitlines():
        if not line.strip():
            continue
        cur.append(line)
        text = "\n".join(cur)
        if text.rstrip().endswith(";") and (not text.lstrip().upper().startswith("CREATE TRIGGER")
                                             or text.rstrip().upper().endswith("END;")):
            out.append(text)
            cur = []
    return out


def _audit(c: sqlite3.Connection, action: str, name: str, version: int | None, reason: str, details: dict,
           who: str, at: float | None = None) -> int:
    """Append one hash-chained audit row inside the caller's transaction."""
    at = time.time() if at is None else at
    reason = reason or ""
    prev = c.execute("SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    prev_hash = prev["hash"] if prev else "0" * 64
    det = json.dumps(json_clean(details), sort_keys=True, default=str)
    h = canonical_sha256([prev_hash, at, who, action, name, version, reason, det])
    cur = c.execute("INSERT INTO audit_log (at, at_iso, actor, action, name, version, reason, details, prev_hash, "
                    "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (at, _iso(at), who, action, name, version, reason, det, prev_hash, h))
    return int(cur.lastrowid)


def _mv(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(row["name"], int(row["version"]), float(row["registered_at"]), row["actor"], row["reason"],
                        row["source"], row["run_id"], row["manifest_sha256"], row["weights_sha256"],
                        json.loads(row["lineage"]))


def _change(row: sqlite3.Row) -> ChampionChange:
    return ChampionChange(int(row["id"]), float(row["at"]), row["actor"], row["name"], int(row["version"]),
                          row["replaced"], row["restore_id"], row["action"], bool(row["forced"]), row["gate_run"],
                          json.loads(row["envelope"]), row["reason"])


def _current(c: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return c.execute("SELECT * FROM champions WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)).fetchone()


# ---------------------------------------------------------------------------------------------
# artifacts

def _local_path(uri: str) -> Path | None:
    """The local folder / file of a ``file://`` URI or plain path; None for remote URIs."""
    p = urllib.parse.urlparse(uri)
    if p.scheme == "file":
        return Path(urllib.request.url2pathname(p.path))
    if p.scheme == "" or (len(p.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


class Registry:
    """The model registry on an MLflow store (``uri``) and a state database (``db``); see the module doc.

    ``lock_timeout``: seconds a write waits for another writer's lock before ``RegistryLockedError``.
    """

    def __init__(self, uri: str | None = None, db: str | Path | None = None, lock_timeout: float = 30.0):
        from roadloop.train.tracking import default_tracking_uri

        self.uri = uri or default_tracking_uri()
        self.db_path = Path(db).expanduser().resolve() if db is not None else default_db_path(self.uri)
        self._db = _StateDB(self.db_path, lock_timeout)
        self._run_uris: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Registry(uri={self.uri!r}, db={str(self.db_path)!r})"

    # ---------------------------------------------------------------- MLflow helpers
    def _client(self):
        from roadloop.train.tracking import _client

        return _client(self.uri)

    @contextmanager
    def _mlflow(self, what: str):
        from roadloop.train.tracking import _guard

        with _guard(self.uri, what):
            yield

    def _run_artifact_uri(self, run_id: str) -> str:
        if run_id not in self._run_uris:
            with self._mlflow(f"reading run '{run_id}'"):
                self._run_uris[run_id] = self._client().get_run(run_id).info.artifact_uri
        return self._run_uris[run_id]

    def _put_json(self, run_id: str, folder: str, filename: str, obj) -> tuple[str, str]:
        """Log ``obj`` as JSON into run ``run_id``'s artifacts; returns (uri, sha256)."""
        with tempfile.TemporaryDirectory(prefix="roadloop-reg-") as tmp:
            p = Path(tmp) / filename
            atomic_write_text(p, json.dumps(json_clean(obj), indent=1, sort_keys=True, default=str))
            sha = sha256_file(p)
            with self._mlflow(f"logging {folder}/{filename} to run '{run_id}'"):
                self._client().log_artifact(run_id, str(p), folder)
        return f"{self._run_artifact_uri(run_id)}/{folder}/{filename}", sha

    def _fetch(self, uri: str, dest: Path) -> Path:
        local = _local_path(uri)
        if local is not None:
            return local
        self._client()  # configures MLflow (quiet loggers, no telemetry) before its artifact API is used
        import mlflow.artifacts

        dest.mkdir(parents=True, exist_ok=True)
        with self._mlflow(f"downloading {uri}"):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                            tracking_uri=self.uri))

    def _get_json(self, uri: str, sha: str, what: str):
        from roadloop.scenarios.suites import cache_root

        p = self._fetch(uri, cache_root() / "registry" / "json" / sha[:16])
        if not p.is_file():
            raise IntegrityError(f"{what}: {uri} is missing")
        if sha256_file(p) != sha:
            raise IntegrityError(f"{what}: {p} was modified (SHA-256 differs from the registry's record)")
        return json.loads(p.read_text())

    # ---------------------------------------------------------------- queries
    def names(self) -> list[str]:
        with self._db.read("listing models") as c:
            return [r["name"] for r in c.execute("SELECT DISTINCT name FROM model_versions ORDER BY name")]

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        with self._db.read("listing versions") as c:
            if name is None:
                rows = c.execute("SELECT * FROM model_versions ORDER BY name, version").fetchall()
            else:
                rows = c.execute("SELECT * FROM model_versions WHERE name = ? ORDER BY version", (name,)).fetchall()
        return [_mv(r) for r in rows]

    def _unknown(self, name: str) -> UnknownModelError:
        known = self.names()
        return UnknownModelError(f"no registered model '{name}' in the registry {self.db_path}"
                                 + (f"; known: {', '.join(known)}" if known else " (it is empty: register a "
                                    "checkpoint with `roadloop registry register DIR`)"))

    def get(self, name: str, version: int) -> ModelVersion:
        with self._db.read("reading a version") as c:
            row = c.execute("SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)).fetchone()
            n = c.execute("SELECT COUNT(*) FROM model_versions WHERE name = ?", (name,)).fetchone()[0]
        if row is None:
            if not n:
                raise self._unknown(name)
            raise UnknownModelError(f"model '{name}' has no version {version} (versions: "
                                    f"{', '.join(str(v.version) for v in self.versions(name))})")
        return _mv(row)

    def champion(self, name: str = DEFAULT_NAME) -> ModelVersion | None:
        """The current champion of ``name`` (None if none was promoted yet)."""
        with self._db.read("reading the champion") as c:
            row = _current(c, name)
        return None if row is None else self.get(name, int(row["version"]))

    def champion_history(self, name: str = DEFAULT_NAME) -> list[ChampionChange]:
        with self._db.read("reading the champion history") as c:
            rows = c.execute("SELECT * FROM champions WHERE name = ? ORDER BY id", (name,)).fetchall()
        return [_change(r) for r in rows]

    def resolve(self, ref: str | int, name: str = DEFAULT_NAME) -> ModelVersion:
        """A version by reference (``parse_ref``); ``champion`` is the current champion."""
        nm, sel = parse_ref(ref, name)
        if sel == CHAMPION:
            mv = self.champion(nm)
            if mv is None:
                if not self.versions(nm):
                    raise self._unknown(nm)
                raise UnknownModelError(f"model '{nm}' has no champion yet: promote a version with "
                                        f"`roadloop registry promote {nm}@VERSION`")
            return mv
        return self.get(nm, int(sel))

    def gate_runs(self, name: str, candidate: int | None = None) -> list[dict]:
        with self._db.read("reading gate runs") as c:
            q = "SELECT * FROM gate_runs WHERE name = ?" + (" AND candidate = ?" if candidate is not None else "")
            rows = c.execute(q + " ORDER BY id", (name,) if candidate is None else (name, candidate)).fetchall()
        return [{**dict(r), "passed": bool(r["passed"]), "results": json.loads(r["results"])} for r in rows]

    def evaluations(self, name: str, version: int) -> list[dict]:
        with self._db.read("reading evaluations") as c:
            rows = c.execute("SELECT * FROM evaluations WHERE name = ? AND version = ? ORDER BY id",
                             (name, version)).fetchall()
        return [{**dict(r), "summary": json.loads(r["summary"])} for r in rows]

    def audit(self, name: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first (the last ``limit`` if given)."""
        with self._db.read("reading the audit log") as c:
            q = "SELECT * FROM audit_log" + (" WHERE name = ?" if name else "") + " ORDER BY id DESC"
            q += f" LIMIT {int(limit)}" if limit else ""
            rows = c.execute(q, (name,) if name else ()).fetchall()
        return [AuditEntry(int(r["id"]), float(r["at"]), r["at_iso"], r["actor"], r["action"], r["name"],
                           r["version"], r["reason"], json.loads(r["details"])) for r in reversed(rows)]

    def verify_audit(self) -> list[str]:
        """Problems in the audit log's hash chain (empty: intact)."""
        problems, prev = [], "0" * 64
        with self._db.read("verifying the audit log") as c:
            for r in c.execute("SELECT * FROM audit_log ORDER BY id"):
                h = canonical_sha256([r["prev_hash"], r["at"], r["actor"], r["action"], r["name"], r["version"],
                                      r["reason"], r["details"]])
                if r["prev_hash"] != prev:
                    problems.append(f"audit row {r['id']}: chain broken (a row before it was removed or changed)")
                if h != r["hash"]:
                    problems.append(f"audit row {r['id']}: content does not match its hash (modified)")
                prev = r["hash"]
        return problems

    # ---------------------------------------------------------------- artifacts
    def artifact_dir(self, mv: ModelVersion, verify: bool = True) -> Path:
        """Local folder of ``mv``'s artifacts (downloaded if the store is remote), verified against the manifest
        recorded at registration unless ``verify`` is False."""
        from roadloop.scenarios.suites import cache_root

        dest = cache_root() / "registry" / mv.name / str(mv.version) / mv.manifest_sha256[:16]
        if _local_path(mv.source) is None:  # remote store: reuse an earlier download if it still verifies
            prev = dest / Path(urllib.parse.urlparse(mv.source).path).name
            try:
                verify_manifest(prev, mv.manifest_sha256, f"registered model {mv.ref}")
                return prev
            except IntegrityError:
                pass
        d = self._fetch(mv.source, dest)
        if verify:
            verify_manifest(d, mv.manifest_sha256, f"registered model {mv.ref}")
        return d

    def load_policy(self, ref: str | int = CHAMPION, name: str = DEFAULT_NAME, **kw):
        """A ``VLAPolicy`` of a registered version (verified artifacts); ``kw`` go to ``VLAPolicy``."""
        from roadloop.policies.vla.policy import VLAPolicy

        mv = self.resolve(ref, name)
        pol = VLAPolicy.from_checkpoint(self.artifact_dir(mv), **kw)
        pol.source = f"registry:{mv.name}@{mv.version}"  # the version itself, not "champion", which moves
        return pol

    # ---------------------------------------------------------------- register
    def register(self, checkpoint_dir: str | Path, lineage: dict | None = None, *, name: str = DEFAULT_NAME,
                 reports: list[str | Path] | tuple = (), reason: str = "", who: str | None = None) -> ModelVersion:
        """Register a VLA checkpoint folder (``model.safetensors`` + ``config.json``) as a new version of ``name``.

        The checkpoint is loaded (format, vocabulary, weights hash, tensor shapes checked), its lineage built
        (``lineage.build_lineage``), the files + ``lineage.json`` + the given evaluation report JSONs
        (``roadloop eval --json`` output) copied into the MLflow artifact store with a SHA-256 manifest, and
        the version recorded.  Idempotent: weights already registered under ``name`` return that version.
        """
        from roadloop.policies.vla.model import load_checkpoint

        _check_name(name)
        who = who or actor()
        ck = Path(checkpoint_dir).expanduser()
        if not ck.is_dir():
            raise RegistryError(f"cannot register {ck}: not a directory (give a checkpoint folder with "
                                f"model.safetensors and config.json)")
        _, meta = load_checkpoint(ck)
        weights = sha256_file(ck / "model.safetensors")
        with self._db.read("looking up weights") as c:
            row = c.execute("SELECT * FROM model_versions WHERE name = ? AND weights_sha256 = ? ORDER BY version "
                            "LIMIT 1", (name, weights)).fetchone()
        if row is not None:
            return _mv(row)
        lin = build_lineage(meta, lineage, ck, self.uri)
        parent_sha = lin["parent"]["weights_sha256"]
        if parent_sha:
            with self._db.read("looking up the parent") as c:
                prow = c.execute("SELECT name, version FROM model_versions WHERE weights_sha256 = ? ORDER BY "
                                 "registered_at LIMIT 1", (parent_sha,)).fetchone()
            if prow is not None:
                lin["parent"]["registry"] = f"{prow['name']}@{prow['version']}"
        with tempfile.TemporaryDirectory(prefix="roadloop-reg-") as tmp:
            stage = Path(tmp) / "model"
            stage.mkdir()
            for f in ("model.safetensors", "config.json"):
                shutil.copy2(ck / f, stage / f)
            if sha256_file(stage / "model.safetensors") != weights:
                raise IntegrityError(f"cannot register {ck}: model.safetensors changed while it was being copied")
            for i, rp in enumerate(reports):
                rp = Path(rp)
                try:
                    rep = report_from_json(json.loads(rp.read_text()))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise RegistryError(f"evaluation report {rp}: not a roadloop eval JSON report ({e})") from e
                dst = f"reports/{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', rep.suite)[:60]}.json"
                (stage / dst).parent.mkdir(exist_ok=True)
                shutil.copy2(rp, stage / dst)
                lin["evaluations"].append({"file": dst, "sha256": sha256_file(stage / dst), "policy": rep.policy,
                                           "suite": rep.suite, "suite_hash": rep.suite_hash, "seed": rep.seed,
                                           "n": len(rep.rollouts), "score": rep.overall["score"].mean,
                                           "collision_at_fault": rep.overall["collision_at_fault"].mean,
                                           "offroad": rep.overall["offroad"].mean})
            atomic_write_text(stage / LINEAGE, json.dumps(lin, indent=1, sort_keys=True))
            manifest_sha = write_manifest(stage)
            from roadloop.train.tracking import Tracker

            tags = {"roadloop.model": name, "roadloop.weights_sha256": weights,
                    "roadloop.manifest_sha256": manifest_sha, "roadloop.actor": who}
            with Tracker(EXPERIMENT, run_name=f"register-{name}", uri=self.uri, tags=tags) as tr:
                tr.log_artifact(stage, "model")
                run_id = tr.run_id
            source = f"{self._run_artifact_uri(run_id)}/model"
        from roadloop.scenarios.suites import cache_root

        # the store must hold exactly what was staged
        verify_manifest(self._fetch(source, cache_root() / "registry" / name / "new" / manifest_sha[:16]),
                        manifest_sha, f"registering {ck} as '{name}'")
        version = self._create_mlflow_version(name, source, run_id, lin, weights, manifest_sha, reason)
        at = time.time()
        existing: list[ModelVersion] = []
        try:
            with self._db.write(f"registering {name}@{version}") as c:
                row = c.execute("SELECT * FROM model_versions WHERE name = ? AND weights_sha256 = ? ORDER BY "
                                "version LIMIT 1", (name, weights)).fetchone()
                if row is not None:  # registered concurrently by another process: keep that one
                    existing.append(_mv(row))
                    raise _Duplicate()
                c.execute("INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (name, version, at, who, reason or "", source, run_id, manifest_sha, weights,
                           json.dumps(lin, sort_keys=True)))
                _audit(c, "register", name, version, reason, {
                    "checkpoint": str(ck.resolve()), "weights_sha256": weights, "manifest_sha256": manifest_sha,
                    "source": source, "trainer": lin.get("trainer"), "training_run": lin.get("training_run"),
                    "git_commit": lin["code"].get("git_commit"), "git_dirty": lin["code"].get("git_dirty"),
                    "missing_lineage": lin["missing"]}, who, at)
        except BaseException as err:
            try:  # keep MLflow in step: no version without its roadloop row
                with self._mlflow("deleting the half-registered version"):
                    self._client().delete_model_version(name, str(version))
            except Exception as e:  # noqa: BLE001 - the original error matters more; the row is absent anyway
                warnings.warn(f"could not delete MLflow model version {name} {version} after a failed "
                              f"registration ({e}); roadloop ignores it", stacklevel=2)
            if isinstance(err, _Duplicate):
                return existing[0]
            raise
        return self.get(name, version)

    def _create_mlflow_version(self, name: str, source: str, run_id: str, lin: dict, weights: str,
                               manifest_sha: str, reason: str) -> int:
        from mlflow.exceptions import MlflowException

        client = self._client()
        with self._mlflow(f"creating registered model '{name}'"):
            try:
                client.get_registered_model(name)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                try:
                    client.create_registered_model(name, description="roadloop driving policy (VLA); champion "
                                                   "pointer and audit log in roadloop's registry database")
                except MlflowException as e2:  # created concurrently
                    if getattr(e2, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
        tr = lin.get("training_run") or {}
        code = lin.get("code") or {}
        tags = {"roadloop.weights_sha256": weights, "roadloop.manifest_sha256": manifest_sha,
                "roadloop.trainer": str(lin.get("trainer")), "roadloop.training_run": str(tr.get("run_id")),
                "roadloop.git_commit": str(code.get("git_commit")), "roadloop.git_dirty": str(code.get("git_dirty")),
                "roadloop.dataset_hash": str(lin.get("dataset_hash")),
                "roadloop.parent": str(lin["parent"].get("registry") or lin["parent"].get("weights_sha256"))}
        link_run = run_id
        if tr.get("run_id"):  # link the training run when it lives in this store
            try:
                with self._mlflow("looking up the training run"):
                    client.get_run(str(tr["run_id"]))
                link_run = str(tr["run_id"])
            except RoadloopError:
                pass
        with self._mlflow(f"creating a version of '{name}'"):
            mv = client.create_model_version(name, source, run_id=link_run, tags=tags, description=reason or None)
        return int(mv.version)

    # ---------------------------------------------------------------- evaluations
    def _cached_report(self, mv: ModelVersion, key: str) -> EvalReport | None:
        with self._db.read("looking up evaluations") as c:
            row = c.execute("SELECT * FROM evaluations WHERE name = ? AND version = ? AND matrix_key = ? ORDER BY "
                            "id DESC LIMIT 1", (mv.name, mv.version, key)).fetchone()
        if row is None:
            return None
        return report_from_json(self._get_json(row["uri"], row["sha256"], f"evaluation {row['id']} of {mv.ref}"))

    def record_evaluation(self, mv: ModelVersion, report: EvalReport, key: str) -> int:
        """Store ``report`` (validation matrix ``key``) with ``mv``: artifact + ``evaluations`` row."""
        fname = f"{key[:16]}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}.json"
        uri, sha = self._put_json(mv.run_id, "evaluations", fname, report.to_json())
        summary = {"policy": report.policy, "suite": report.suite, "n": len(report.rollouts),
                   **{k: report.overall[k].mean for k in ("score", "collision_at_fault", "offroad",
                                                          "comfort_violation", "reasoning_consistency")
                      if k in report.overall}}
        with self._db.write(f"recording an evaluation of {mv.ref}") as c:
            cur = c.execute("INSERT INTO evaluations (at, name, version, matrix_key, uri, sha256, summary) VALUES "
                            "(?, ?, ?, ?, ?, ?, ?)", (time.time(), mv.name, mv.version, key, uri, sha,
                                                      json.dumps(json_clean(summary), sort_keys=True)))
            return int(cur.lastrowid)

    def matrix_report(self, mv: ModelVersion, cfg: GateConfig, suites=None, *, record: bool = True,
                      on_eval: Callable[[str, int], Callable[[int], None] | None] | None = None) -> EvalReport:
        """``mv``'s report on the validation matrix of ``cfg``: the recorded one for the same matrix key,
        else evaluated now (and recorded)."""
        from roadloop.registry.matrix import evaluate_matrix, load_matrix, matrix_key, matrix_size

        suites = load_matrix(cfg.matrix) if suites is None else suites
        key = matrix_key(cfg.matrix, suites)
        rep = self._cached_report(mv, key)
        if rep is not None:
            return rep
        pol = self.load_policy(mv.version, mv.name)
        adv = on_eval(f"validate {mv.ref}", matrix_size(suites, cfg.matrix)) if on_eval else None
        rep = evaluate_matrix(pol, cfg.matrix, suites, on_batch=adv)
        if record:
            self.record_evaluation(mv, rep, key)
        return rep

    # ---------------------------------------------------------------- gates
    @staticmethod
    def _ident(mv: ModelVersion | None) -> dict | None:
        return None if mv is None else {"name": mv.name, "version": mv.version, "manifest_sha256": mv.manifest_sha256,
                                        "weights_sha256": mv.weights_sha256, "registered_at": mv.registered_at}

    def gate(self, candidate: str | int | Path, cfg: GateConfig | None = None, *, name: str = DEFAULT_NAME,
             record: bool = True, who: str | None = None,
             on_eval: Callable[[str, int], Callable[[int], None] | None] | None = None) -> GateRun:
        """Apply the gates to ``candidate`` (a registered reference or a checkpoint folder) against the current
        champion of its model on the validation matrix of ``cfg`` (default: ``gates.yaml``).  Evaluations of
        registered versions are recorded (and reused for the same matrix key); the gate result of a registered
        candidate is recorded when ``record`` (a folder is only evaluated and judged)."""
        from roadloop.registry.matrix import eval_code_hash, evaluate_matrix, load_matrix, matrix_key, matrix_size

        cfg = cfg or load_gate_config()
        who = who or actor()
        folder = Path(str(candidate)).expanduser()
        mv = None
        if isinstance(candidate, Path) or (folder.is_dir() and (folder / "config.json").is_file()):
            from roadloop.policies.vla.policy import VLAPolicy

            champ = self.champion(name)
            cand_id = {"checkpoint": str(folder.resolve()), "weights_sha256": sha256_file(folder / "model.safetensors")}
            suites = load_matrix(cfg.matrix)
            adv = on_eval(f"validate {folder}", matrix_size(suites, cfg.matrix)) if on_eval else None
            cand_rep = evaluate_matrix(VLAPolicy.from_checkpoint(folder), cfg.matrix, suites, on_batch=adv)
            record = False
        else:
            try:
                mv = self.resolve(candidate, name)
            except UnknownModelError as e:
                if os.sep in str(candidate) or str(candidate).startswith((".", "~")):
                    raise UnknownModelError(f"{e} (nor is '{candidate}' a checkpoint folder with config.json)") from e
                raise
            name = mv.name
            champ = self.champion(name)
            if champ is not None and champ.version == mv.version:
                raise RegistryError(f"{mv.ref} is already the champion of '{name}'")
            self.artifact_dir(mv)  # refuse tampered artifacts before spending minutes on evaluation
            cand_id = self._ident(mv)
            suites = load_matrix(cfg.matrix)
            cand_rep = self.matrix_report(mv, cfg, suites, on_eval=on_eval)
        champ_rep = self.matrix_report(champ, cfg, suites, on_eval=on_eval) if champ else None
        summary = run_gates(cand_rep, champ_rep, cfg)
        run = GateRun(time.time(), who, cand_id, self._ident(champ), cfg.to_dict(), cfg.sha256,
                      matrix_key(cfg.matrix, suites), eval_code_hash(), summary, cand_rep, champ_rep)
        if record and mv is not None:
            self._record_gate_run(mv, run, who)
        return run

    def _upload_gate_run(self, mv: ModelVersion, run: GateRun) -> str:
        """Store the gate report with ``mv``'s artifacts (before the transaction that records it); its SHA-256."""
        fname = f"gate-{int(run.created_at * 1000)}-{run.origin}-{uuid.uuid4().hex[:12]}.json"
        run.uri, sha = self._put_json(mv.run_id, "gates", fname, run.to_json())
        return sha

    @staticmethod
    def _insert_gate_run(c: sqlite3.Connection, mv: ModelVersion, run: GateRun, sha: str, who: str) -> int:
        cur = c.execute("INSERT INTO gate_runs (at, actor, name, candidate, champion, passed, config_sha256, "
                        "matrix_key, eval_code, results, uri, sha256, origin) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (run.created_at, who, mv.name, mv.version, (run.champion or {}).get("version"),
                         int(run.passed), run.config_sha256, run.matrix_key, run.eval_code,
                         json.dumps(json_clean(run.summary.to_json()), sort_keys=True), run.uri, sha, run.origin))
        run.id = int(cur.lastrowid)
        _audit(c, "gate-pass" if run.passed else "gate-fail", mv.name, mv.version, "; ".join(run.summary.reasons()),
               {"gate_run": run.id, "champion": (run.champion or {}).get("version"), "failed": run.summary.failed,
                "config_sha256": run.config_sha256, "origin": run.origin, "matrix_key": run.matrix_key}, who)
        return run.id

    def _record_gate_run(self, mv: ModelVersion, run: GateRun, who: str) -> int:
        sha = self._upload_gate_run(mv, run)
        with self._db.write(f"recording a gate result for {mv.ref}") as c:
            return self._insert_gate_run(c, mv, run, sha, who)

    def _reusable_gate_run(self, mv: ModelVersion, champ: ModelVersion | None, cfg: GateConfig) -> GateRun | None:
        """The latest recorded gate run of ``mv`` against ``champ`` under ``cfg`` on the current code, made after
        ``mv`` was registered."""
        from roadloop.registry.matrix import eval_code_hash

        with self._db.read("looking up gate runs") as c:
            row = c.execute("SELECT * FROM gate_runs WHERE name = ? AND candidate = ? AND config_sha256 = ? AND "
                            "champion IS ? AND eval_code = ? AND at >= ? ORDER BY id DESC LIMIT 1",
                            (mv.name, mv.version, cfg.sha256, champ.version if champ else None, eval_code_hash(),
                             mv.registered_at)).fetchone()
        if row is None:
            return None
        d = self._get_json(row["uri"], row["sha256"], f"gate run {row['id']} of {mv.ref}")
        run = self._gate_run_from_json(d)
        run.id, run.uri, run.origin, run.reused = int(row["id"]), row["uri"], row["origin"], True
        return run

    @staticmethod
    def _gate_run_from_json(d: dict) -> GateRun:
        try:
            if d.get("format") != GATE_REPORT_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {GATE_REPORT_FORMAT}")
            return GateRun(float(d["created_at"]), str(d.get("actor", "")), dict(d["candidate"]),
                           dict(d["champion"]) if d.get("champion") else None, dict(d["config"]),
                           str(d["config_sha256"]), str(d["matrix_key"]), str(d["eval_code"]),
                           GateSummary.from_json(d["gates"]),
                           report_from_json(d["candidate_report"]) if d.get("candidate_report") else None,
                           report_from_json(d["champion_report"]) if d.get("champion_report") else None)
        except (KeyError, TypeError, ValueError) as e:
            raise StaleGateReportError(f"not a roadloop gate report ({e})") from e

    def _check_gate_report(self, path: str | Path | dict, mv: ModelVersion, champ: ModelVersion | None,
                           cfg: GateConfig) -> GateRun:
        """A gate report file accepted by ``promote``: same candidate, current champion, same config and code,
        newer than the candidate, and its verdict reproduced by re-running the (pure) gates on its reports."""
        from roadloop.registry.matrix import eval_code_hash

        src = "the given gate report" if isinstance(path, dict) else f"gate report {path}"
        try:
            d = path if isinstance(path, dict) else json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise StaleGateReportError(f"{src}: cannot read it ({e})") from e
        run = self._gate_run_from_json(d)
        c = run.candidate
        if c.get("name") != mv.name or c.get("version") != mv.version or c.get("manifest_sha256") != mv.manifest_sha256:
            raise StaleGateReportError(f"{src} is for {c.get('name')}@{c.get('version')} (manifest "
                                       f"{str(c.get('manifest_sha256'))[:12]}), not {mv.ref}")
        want = self._ident(champ)
        have = run.champion
        if (want is None) != (have is None) or (want and (have["version"] != want["version"] or
                                                          have["manifest_sha256"] != want["manifest_sha256"])):
            raise StaleGateReportError(f"{src} compared against champion "
                                       f"{have and have.get('version')}, but the champion is now "
                                       f"{want and want['version']}: run `roadloop gate {mv.ref}` again")
        if run.config_sha256 != cfg.sha256 or canonical_sha256(run.config) != run.config_sha256:
            raise StaleGateReportError(f"{src} was made with another gate config ({run.config_sha256[:12]}) than "
                                       f"the one in force ({cfg.sha256[:12]})")
        if run.eval_code != eval_code_hash():
            raise StaleGateReportError(f"{src} was made with other simulator / evaluation code "
                                       f"({run.eval_code} vs {eval_code_hash()}): run the gates again")
        if run.created_at < mv.registered_at:
            raise StaleGateReportError(f"{src} is older than {mv.ref}'s registration")
        if run.candidate_report is None:
            raise StaleGateReportError(f"{src} holds no candidate report")
        again = run_gates(run.candidate_report, run.champion_report, cfg)
        if again.to_json() != run.summary.to_json():
            raise StaleGateReportError(f"{src}: re-running the gates on its reports gives a different verdict "
                                       f"(passed {again.passed}, failed {again.failed}); the file was edited")
        run.origin = "file"
        return run

    # ---------------------------------------------------------------- promote / rollback
    def promote(self, candidate: str | int, cfg: GateConfig | None = None, *, name: str = DEFAULT_NAME,
                gate_report: str | Path | dict | None = None, force: bool = False, reason: str = "",
                who: str | None = None,
                on_eval: Callable[[str, int], Callable[[int], None] | None] | None = None) -> Promotion:
        """Make ``candidate`` the champion if every gate passes (``GateFailedError`` naming the failed gates
        otherwise).  Gate results: ``gate_report`` (a file from ``roadloop gate --json``), else a recorded run
        for this candidate, champion, config and code, else the gates are run now.  ``force`` promotes
        despite failed gates (a reason is required; recorded as forced).  The champion change, its gate run
        and the audit row are one transaction; ``ConcurrentChangeError`` if another promotion or rollback
        changed the champion meanwhile."""
        who = who or actor()
        if force and not reason.strip():
            raise RegistryError("--force needs a --reason (it is recorded in the audit log)")
        cfg = cfg or load_gate_config()
        mv = self.resolve(candidate, name)
        champ = self.champion(mv.name)
        if champ is not None and champ.version == mv.version:
            raise RegistryError(f"{mv.ref} is already the champion of '{mv.name}'")
        self.artifact_dir(mv)  # IntegrityError for tampered / truncated artifacts, even with --force
        run = self._gate_for_promotion(mv, champ, cfg, gate_report, who, on_eval)
        sha = self._upload_gate_run(mv, run) if run.id is None else None
        if not run.passed and not force:
            reasons = run.summary.reasons()
            try:
                with self._db.write(f"recording the refused promotion of {mv.ref}") as c:
                    if run.id is None:
                        self._insert_gate_run(c, mv, run, sha, who)
                    _audit(c, "promote-refused", mv.name, mv.version, reason, {
                        "gate_run": run.id, "failed": run.summary.failed, "reasons": reasons,
                        "champion": champ and champ.version}, who)
            except RegistryError as e:
                warnings.warn(f"could not record the refused promotion: {e}", stacklevel=2)
            raise GateFailedError(f"{mv.ref} not promoted: gate(s) {', '.join(run.summary.failed)} failed: "
                                  + "; ".join(reasons), run.summary)
        envelope = dict(cfg.to_dict()["envelope"])
        stale: list[int | None] = []
        with self._db.write(f"promoting {mv.ref}") as c:
            cur = _current(c, mv.name)
            now_v = int(cur["version"]) if cur is not None else None
            if now_v != (champ.version if champ else None):
                # committed on its own: the refusal is recorded, the champion untouched
                _audit(c, "promote-refused", mv.name, mv.version, reason,
                       {"why": "champion changed while gating", "gated_against": champ and champ.version,
                        "champion": now_v}, who)
                stale.append(now_v)
            else:
                change = self._insert_promotion(c, mv, run, sha, cur, now_v, force, envelope, reason, who, cfg)
        if stale:
            raise ConcurrentChangeError(f"{mv.ref} not promoted: the champion of '{mv.name}' changed from "
                                        f"{champ and champ.version} to {stale[0]} while it was being gated; run "
                                        f"`roadloop registry promote {mv.ref}` again to gate it against {stale[0]}")
        return Promotion(change, run, self.sync_alias(mv.name))

    def _insert_promotion(self, c, mv, run, sha, cur, now_v, force, envelope, reason, who, cfg) -> ChampionChange:
        if run.id is None:
            self._insert_gate_run(c, mv, run, sha, who)
        forced = force and not run.passed
        at = time.time()
        row = c.execute("INSERT INTO champions (at, actor, name, version, replaced, restore_id, action, forced, "
                        "gate_run, envelope, reason) VALUES (?, ?, ?, ?, ?, ?, 'promote', ?, ?, ?, ?)",
                        (at, who, mv.name, mv.version, now_v, int(cur["id"]) if cur is not None else None,
                         int(forced), run.id, json.dumps(envelope, sort_keys=True), reason or ""))
        cid = int(row.lastrowid)
        _audit(c, "promote-forced" if forced else "promote", mv.name, mv.version, reason, {
            "replaced": now_v, "gate_run": run.id, "gate_passed": run.passed, "failed": run.summary.failed,
            "reused_gate_run": run.reused, "gate_origin": run.origin, "envelope": envelope,
            "config_sha256": cfg.sha256}, who, at)
        return _change(c.execute("SELECT * FROM champions WHERE id = ?", (cid,)).fetchone())

    def _gate_for_promotion(self, mv, champ, cfg, gate_report, who, on_eval) -> GateRun:
        if gate_report is not None:
            return self._check_gate_report(gate_report, mv, champ, cfg)
        run = self._reusable_gate_run(mv, champ, cfg)
        if run is not None:
            return run
        run = self.gate(mv.ref, cfg, record=False, who=who, on_eval=on_eval)
        # record the evaluations (not the gate run: promote records it in its own transaction)
        return run

    def rollback(self, name: str = DEFAULT_NAME, *, reason: str = "", who: str | None = None) -> Promotion:
        """Make the previous champion the champion again (stack semantics: repeated rollbacks walk back through
        the promotion history).  Its artifacts are verified first; no gates are run (it passed them when it
        was promoted)."""
        who = who or actor()
        with self._db.read("reading the champion") as c:
            cur = _current(c, name)
            target = c.execute("SELECT * FROM champions WHERE id = ?", (cur["restore_id"],)).fetchone() \
                if cur is not None and cur["restore_id"] is not None else None
        if cur is None:
            if not self.versions(name):
                raise self._unknown(name)
            raise UnknownModelError(f"model '{name}' has no champion: nothing to roll back")
        if target is None:
            raise RegistryError(f"{name}@{cur['version']} is the first champion of '{name}': there is no previous "
                                f"champion to roll back to")
        prev = self.get(name, int(target["version"]))
        self.artifact_dir(prev)
        with self._db.write(f"rolling back {name}") as c:
            now = _current(c, name)
            if now is None or int(now["id"]) != int(cur["id"]):
                raise ConcurrentChangeError(f"the champion of '{name}' changed during the rollback; nothing was "
                                            f"changed: check `roadloop registry list` and retry")
            at = time.time()
            row = c.execute("INSERT INTO champions (at, actor, name, version, replaced, restore_id, action, forced, "
                            "gate_run, envelope, reason) VALUES (?, ?, ?, ?, ?, ?, 'rollback', 0, ?, ?, ?)",
                            (at, who, name, prev.version, int(cur["version"]), target["restore_id"],
                             target["gate_run"], target["envelope"], reason or ""))
            cid = int(row.lastrowid)
            _audit(c, "rollback", name, prev.version, reason, {"replaced": int(cur["version"]),
                                                               "restored_champion_row": int(target["id"])}, who, at)
            change = _change(c.execute("SELECT * FROM champions WHERE id = ?", (cid,)).fetchone())
        return Promotion(change, None, self.sync_alias(name))

    def sync_alias(self, name: str = DEFAULT_NAME) -> list[str]:
        """Point MLflow's ``champion`` alias (and the version's ``roadloop.envelope`` tag) at the current champion;
        returns warnings instead of raising (the state database is authoritative)."""
        try:
            with self._db.read("reading the champion") as c:
                cur = _current(c, name)
            if cur is None:
                return []
            client = self._client()
            with self._mlflow(f"setting the '{CHAMPION}' alias of '{name}'"):
                try:
                    have = client.get_model_version_by_alias(name, CHAMPION).version
                except Exception:  # noqa: BLE001 - no alias yet
                    have = None
                if str(have) != str(cur["version"]):
                    client.set_registered_model_alias(name, CHAMPION, str(cur["version"]))
                    client.set_model_version_tag(name, str(cur["version"]), "roadloop.envelope", cur["envelope"])
            return []
        except RoadloopError as e:
            return [f"MLflow alias not updated ({e}); the registry database is authoritative"]


# ---------------------------------------------------------------------------------------------
# module-level entry points

def register_candidate(checkpoint_dir: str | Path, lineage: dict, *, name: str = DEFAULT_NAME,
                       reports: list[str | Path] | tuple = (), reason: str = "", uri: str | None = None,
                       db: str | Path | None = None) -> ModelVersion:
    """Register a trainer's final checkpoint as a candidate version (never promotes: that is
    ``roadloop registry promote``, which runs the gates).

    Call at the end of ``train grpo`` / ``train road`` / ``train il`` with the lineage the trainer knows::

        register_candidate(run_dir / "final", {
            "trainer": "grpo", "config": to_dict(cfg), "run_id": tracker.run_id,
            "parent": cfg.init, "parent_weights_sha256": init_sha,       # the init checkpoint
            "suites": {"train": "<content hash>", ...},                   # training suites
            "dataset_hash": None,                                         # IL: the demonstration dataset's hash
            "code": code_version_captured_at_start,                       # roadloop.registry.code_version()
        }, reports=[final_eval_json] if any else ())

    ``uri`` (default: the trackers' ``default_tracking_uri()``) and ``db`` (default: ``default_db_path``)
    select the registry.  Returns the ``ModelVersion`` (the existing one if these weights are registered).
    """
    return Registry(uri, db).register(checkpoint_dir, lineage, name=name, reports=reports, reason=reason or
                                      f"candidate from {lineage.get('trainer') or 'training'}")


_POLICY_PREFIXES = ("registry:", "champion:")


def is_registry_policy(spec: str) -> bool:
    return spec == CHAMPION or spec.startswith(_POLICY_PREFIXES)


def resolve_policy(spec: str, **kw):
    """``champion`` (the default model's), ``champion:NAME``, ``registry:NAME@VERSION`` / ``registry:NAME@champion``
    -> a ``VLAPolicy`` with verified artifacts (``roadloop eval --policy champion``)."""
    if spec == CHAMPION:
        ref = CHAMPION
    elif spec.startswith("champion:"):
        ref = f"{spec[len('champion:'):]}@{CHAMPION}"
    elif spec.startswith("registry:"):
        ref = spec[len("registry:"):]
    else:
        raise UnknownModelError(f"'{spec}' is not a registry policy (champion, champion:NAME, registry:NAME@VERSION)")
    return Registry().load_policy(ref, **kw)


__all__ = ["CHAMPION", "DEFAULT_NAME", "AuditEntry", "ChampionChange", "GateRun", "ModelVersion", "Promotion",
           "Registry", "default_db_path", "is_registry_policy", "parse_ref", "register_candidate", "resolve_policy"]
