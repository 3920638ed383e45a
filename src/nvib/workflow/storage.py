"""Optuna storages for the knob search: an RDB storage with heartbeats (a killed worker's trial is re-queued), and
one-line errors for a missing driver, a bad URL or an unreachable server."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

from nvib.workflow.settings import GRACE_PERIOD, HEARTBEAT_INTERVAL

__all__ = ["StorageError", "load_study", "open_storage", "safe_url"]

#: Python module of a database driver -> the package that provides it.
_DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "oracledb": "oracledb",
    "pyodbc": "pyodbc",
}


class StorageError(ValueError):
    """The Optuna storage URL cannot be used (missing driver, server unreachable, bad URL)."""


def safe_url(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it as given
        return url


def _missing_module(err: BaseException) -> str:
    """The top-level module an ImportError (or one it wraps, as Optuna does) failed to import."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ImportError) and seen.name:
            return seen.name.split(".")[0]
        seen = seen.__cause__ or seen.__context__
    return "the database driver"


def open_storage(
    url: str, *, heartbeat_interval: int | None = HEARTBEAT_INTERVAL, grace_period: int | None = GRACE_PERIOD
) -> RDBStorage:
    """An Optuna RDB storage whose running trials send a heartbeat every ``heartbeat_interval`` s;
    a trial silent for ``grace_period`` s is failed and re-queued (up to 3 times).

    Raises StorageError (one line, naming the fix) for a missing database driver, an unreachable
    server or a malformed URL.
    """
    if heartbeat_interval is not None and grace_period is not None and grace_period <= heartbeat_interval:
        raise ValueError(
            f"grace_period ({grace_period} s) must exceed heartbeat_interval ({heartbeat_interval} s): "
            "a live trial would be failed between two heartbeats"
        )
    safe = safe_url(url)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback = RetryHeartbeatStaleTrialCallback(max_retry=3) if heartbeat_interval else None
                return RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period if heartbeat_interval else None,
                    heartbeat_stale_trial_callback=callback,
                )
        except ImportError as err:
            module = _missing_module(err)
            package = _DRIVER_PACKAGES.get(module, module)
            extra = " (or pip install 'nvib[postgres]')" if module == "psycopg" else ""
            raise StorageError(
                f"the Optuna storage {safe} needs the database driver {module!r}, which is not installed. "
                f"Fix: pip install '{package}'{extra}, or use a sqlite:/// storage"
            ) from None
        except sqlalchemy.exc.NoSuchModuleError:
            raise StorageError(
                f"{safe} names an unknown database dialect. Fix: use an SQLAlchemy URL such as "
                "sqlite:///path/study.db or postgresql://user:password@host:5432/database"
            ) from None
        except sqlalchemy.exc.ArgumentError as err:
            raise StorageError(
                f"{safe!r} is not a storage URL ({err}). Fix: e.g. sqlite:///path/study.db or "
                "postgresql://user:password@host:5432/database"
            ) from None
        except sqlalchemy.exc.OperationalError as err:
            reason = " ".join(str(getattr(err, "orig", err)).split())
            if url.startswith("sqlite:"):
                raise StorageError(
                    f"cannot write the Optuna storage {safe} ({reason}). Fix: free disk space, check that its folder "
                    "exists and is writable, or set search.storage to a file elsewhere"
                ) from None
            raise StorageError(
                f"cannot connect to the Optuna storage {safe} ({reason}). "
                "Fix: start the database server, or correct host, port, user and database in the URL"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together on an empty database race to create Optuna's tables; the loser
            # sees a duplicate table or row: the tables exist now, so try again.
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
        except sqlalchemy.exc.DatabaseError as err:  # after its subclasses above (damaged file)
            reason = " ".join(str(getattr(err, "orig", err)).split())
            raise StorageError(
                f"the Optuna storage {safe} is not a readable study database ({reason}): the file is damaged or "
                "not Optuna's. Fix: move it away and rerun (its trials are lost), or use a new run directory"
            ) from None
    raise AssertionError("unreachable")


def load_study(storage: str | BaseStorage, study_name: str, **storage_kwargs: Any) -> optuna.Study | None:
    """The stored study of that name, or None (an absent SQLite file is not created just to look)."""
    if isinstance(storage, str):
        if storage.startswith("sqlite:///") and not os.path.isfile(storage[len("sqlite:///") :]):
            return None
        storage = open_storage(storage, **storage_kwargs)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
