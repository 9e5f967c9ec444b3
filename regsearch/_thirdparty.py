"""Every private API of Optuna and MLflow that regsearch uses, in one place (tests/test_thirdparty.py checks them).

A new Optuna or MLflow release that renames one of these fails that test with the name of what moved, instead of
failing a study midway. Where a public API does the same job, it is used instead and nothing is listed here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    from mlflow.pyfunc import PythonModel
    from optuna.storages import BaseStorage
    from sqlalchemy.engine import Engine


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage object a study reads and writes (Optuna has no public accessor)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study: it tells apart two studies of one name, one deleted and made again."""
    return study._study_id


def trial_id(trial: optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial, which the storage's own calls (state changes, reads) take."""
    return trial._trial_id


def journal_file(storage: BaseStorage) -> str | None:
    """The file of a journal storage (None for any other storage): the lock files beside it are named after it."""
    return getattr(getattr(storage, "_backend", None), "_file_path", None)


def check_mlflow_store(uri: str) -> None:
    """Raise when MLflow has no tracking store for `uri`'s scheme (without connecting, migrating or creating)."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    _tracking_store_registry.get_store_builder(uri)


def upgrade_mlflow_db(engine: Engine) -> None:
    """Run MLflow's schema migrations on a tracking database (what `mlflow db upgrade` does, without a CLI)."""
    from mlflow.store.db.utils import _upgrade_db

    _upgrade_db(engine)


def scan_installed_packages() -> None:
    """MLflow's scan of every installed package, cached: done early, it is not done while the best model logs."""
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()


@functools.cache
def unchecked_python_model() -> type[PythonModel]:
    """MLflow's `PythonModel` without its wrapper that checks `predict`'s type hints (and warns where there are
    none): a subclass that checks its own inputs needs neither. MLflow's own models set the same attribute."""
    from mlflow.pyfunc import PythonModel

    class UncheckedPythonModel(PythonModel):
        _skip_type_hint_validation = True

    return UncheckedPythonModel

