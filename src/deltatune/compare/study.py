"""The comparison's work queues as Optuna studies in a database, and the workers that drain them.

One study per method (`NAME/search/ROW`) holds its search trials; one more (`NAME/final`) holds
the final runs, one trial per run. The process that runs `deltatune compare CONFIG` creates the
studies and puts exactly the planned trials in them as WAITING trials (an empty trial for the
sampler to fill, or a grid point); every worker — its own `workers` threads, and any
`deltatune compare CONFIG --join` process on this or another machine pointed at the same
storage — takes a WAITING trial by moving it to RUNNING in one database transaction, so no
trial is run twice. A worker sends a heartbeat while its trial runs; a trial whose heartbeat
stops (the worker was killed) is marked failed by the next worker that looks, and a copy with
the same parameters is queued again (Optuna's RetryHeartbeatStaleTrialCallback), so nothing is
lost either.

The storage is any SQLAlchemy URL; by default the SQLite file OUT/study.db (nothing to start).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from deltatune.errors import DeltatuneError

HEARTBEAT_ENV = "DELTATUNE_HEARTBEAT_S"  # seconds between heartbeats (a stale trial: 2x this)
DEFAULT_HEARTBEAT_S = 30
POLL_S = 1.0
WAIT_FOR_COORDINATOR_S = 600  # a --join worker waits this long for the studies to appear


def storage_url(search: dict | None, out_dir: Path) -> str:
    url = (search or {}).get("storage")
    return url or f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_storage(url: str):
    """Optuna's RDBStorage with heartbeats and retry of stale trials; a bad URL is one line."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    interval = int(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S))
    engine = {}
    if url.startswith("sqlite"):
        # several processes write one file: wait for its lock instead of failing at once
        engine = {"connect_args": {"timeout": 120}}
        database = make_url(url).database
        if database and not Path(database).parent.is_dir():
            raise DeltatuneError(f"compare.search.storage: cannot open {url!r}: the folder "
                                 f"{Path(database).parent} does not exist")
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=interval,
                                  grace_period=2 * interval,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        except DBAPIError:
            # two workers creating the tables of a new database at once: one of them loses the
            # race (the tables exist, or the file is locked); the next try finds them made
            if attempt < 5:
                time.sleep(1 + attempt)
                continue
            reason = "the database did not answer after 6 tries"
        except Exception as exc:  # driver missing, host unreachable, not a database: one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeltatuneError(f"compare.search.storage: cannot open {url!r}: {reason}") from None


def study_prefix(out_dir: Path) -> str:
    return f"deltatune:{out_dir.resolve().name}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"


# ------------------------------------------------------------------------------------- queue
def pop_waiting(study) -> int | None:
    """A WAITING trial of `study`, now RUNNING and ours; None when there is none. The move is one
    conditional UPDATE (... WHERE state = WAITING), so two workers never get the same trial, on
    any database (SQLite has no row locks: a read-then-write could hand one trial to two)."""
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    engine = getattr(study._storage, "_backend", study._storage).engine
    table = models.TrialModel.__table__
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        with engine.begin() as connection:
            taken = connection.execute(
                sqlalchemy.update(table)
                .where(table.c.trial_id == trial._trial_id, table.c.state == TrialState.WAITING)
                .values(state=TrialState.RUNNING, datetime_start=datetime.now(timezone.utc).replace(tzinfo=None))).rowcount
        if taken == 1:
            return trial._trial_id
    return None


@contextmanager
def heartbeat(storage, trial_id: int):
    """Record the trial's heartbeat every interval while the block runs."""
    stop = threading.Event()
    storage.record_heartbeat(trial_id)

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a busy database: the next beat will do
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def unfinished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


def drain(queues: list[tuple[Any, Callable[[Any, int], None]]]) -> int:
    """Run WAITING trials of the (study, run) queues, in order, until none is waiting or running
    anywhere (a trial running elsewhere may still fail and come back). Returns how many ran here."""
    import optuna
    from optuna.storages import fail_stale_trials

    ran = 0
    while True:
        busy = False
        for study, run in queues:
            with warnings.catch_warnings():  # experimental in optuna, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)  # a killed worker's trial: failed, and queued again
            trial_id = pop_waiting(study)
            if trial_id is not None:
                with heartbeat(study._storage, trial_id):
                    run(study, trial_id)
                ran += 1
                break
            busy = busy or unfinished(study) > 0
        else:
            if not busy:
                return ran
            time.sleep(POLL_S)


def in_threads(workers: int, work: Callable[[], int]) -> int:
    """`work` in `workers` threads at once, the CPU threads divided between their children."""
    if workers <= 1:
        return work()
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    results, errors = [], []

    def one() -> None:
        try:
            results.append(work())
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    try:
        pool = [threading.Thread(target=one) for _ in range(workers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if errors:
        raise errors[0]
    return sum(results)


# ----------------------------------------------------------------------------------- studies
def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def prepare(storage, name: str, key: dict, entries: list[tuple[dict, dict]], direction: str,
            overwrite: bool, fresh: bool = False, older_key: dict | None = None) -> None:
    """Create study `name` with one WAITING trial per (params, user_attrs) entry, or keep it
    when it was made with the same `key` (a rerun continues it). `fresh`: always start over.
    `older_key`: the same settings as an older version wrote them; such a study is continued
    and its key brought up to date (so --join workers find it)."""
    import optuna
    from optuna.trial import TrialState

    from deltatune.compare.jobs import _first_difference

    key = _plain(key)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        old = existing.user_attrs.get("key")
        if old == key and not fresh:
            return
        if older_key is not None and old == _plain(older_key) and not fresh:
            existing.set_user_attr("key", key)
            return
        if old is not None and old != key and not overwrite and not fresh:
            if existing.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                           TrialState.FAIL)):
                raise DeltatuneError(f"compare.search: the study {name!r} in {storage.url} was made with "
                                     f"other settings ({_first_difference(old, key)}); pass --overwrite "
                                     "to start it again, or use another output_dir/storage")
        optuna.delete_study(study_name=name, storage=storage)  # stale, fresh, or cut short while queued
    study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    for params, attrs in entries:
        study.enqueue_trial(params, user_attrs=attrs)
    study.set_user_attr("key", key)  # last: a study without its key was cut short and is redone


def wait_for(storage, name: str, key: dict | None = None):
    """A --join worker waits for the coordinator's study (with this key, when given)."""
    import optuna

    deadline = time.time() + WAIT_FOR_COORDINATOR_S
    said = False
    while True:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            found = study.user_attrs.get("key")
            if found is not None and (key is None or found == _plain(key)):
                return study
        except KeyError:
            pass
        if time.time() > deadline:
            raise DeltatuneError(f"--join: no study {name!r} with these settings appeared in {storage.url} "
                                 f"within {WAIT_FOR_COORDINATOR_S} s; start `deltatune compare CONFIG` "
                                 "(without --join) with the same config first")
        if not said:
            print(f"--join: waiting for {name!r} in {storage.url} ...", flush=True)
            said = True
        time.sleep(POLL_S)


def load(storage, name: str, sampler=None, pruner=None):
    import optuna

    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


@dataclass
class Watch:
    """Reads a running trial's held-out evaluations and stops it when the pruner says so."""
    trial: Any
    metrics_path: Path
    metric: str
    pruned: bool = False

    def start(self, process) -> None:
        threading.Thread(target=self._watch, args=(process,), daemon=True).start()

    def _watch(self, process) -> None:
        seen = set()
        while process.poll() is None:
            for record in self._evaluations():
                step = record["step"]
                if step in seen:
                    continue
                seen.add(step)
                self.trial.report(float(record[f"eval_{self.metric}"]), step)
                if self.trial.should_prune():
                    self.pruned = True
                    process.kill()
                    return
            time.sleep(0.3)

    def _evaluations(self) -> list[dict]:
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written
                continue
            if f"eval_{self.metric}" in record and "step" in record:
                records.append(record)
        return records
