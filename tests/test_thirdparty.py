"""Each private Optuna or MLflow API that regsearch uses (all in `regsearch._thirdparty`) still does its job.

A failure here names what a new Optuna or MLflow release changed, before a study fails midway on it.
"""

import pytest

from regsearch import _thirdparty


def _moved(what: str) -> str:
    return f"{what} changed in this Optuna/MLflow release: update regsearch/_thirdparty.py"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import optuna

    from regsearch._storage import open_storage

    storage = open_storage(str(tmp_path_factory.mktemp("s") / "s.journal"))
    made = optuna.create_study(study_name="s", storage=storage)
    made.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return made


def test_optuna_study_storage_and_ids(study):
    import optuna

    storage = _thirdparty.study_storage(study)
    assert isinstance(storage, optuna.storages.BaseStorage), _moved("optuna.Study._storage")
    assert storage.get_study_id_from_name("s") == _thirdparty.study_id(study), _moved("optuna.Study._study_id")
    trial = study.trials[1]
    assert storage.get_trial(_thirdparty.trial_id(trial)).number == 1, _moved("optuna FrozenTrial._trial_id")


def test_optuna_journal_file(study, tmp_path):
    from regsearch._storage import open_storage

    path = _thirdparty.journal_file(_thirdparty.study_storage(study))
    assert path is not None and path.endswith("s.journal"), _moved("optuna JournalStorage._backend._file_path")
    assert _thirdparty.journal_file(open_storage(f"sqlite:///{tmp_path}/s.db")) is None


def test_mlflow_store_check_takes_a_known_scheme_and_refuses_an_unknown_one(tmp_path):
    try:
        _thirdparty.check_mlflow_store(f"sqlite:///{tmp_path}/m.db")
    except ImportError as exc:
        pytest.fail(_moved(f"mlflow's _tracking_store_registry ({exc})"))
    with pytest.raises(Exception, match="nosuch"):
        _thirdparty.check_mlflow_store("nosuch://host/x")
    assert not (tmp_path / "m.db").exists(), "checking a URI must not create the store"


def test_mlflow_upgrade_db_runs_on_a_store(tmp_path):
    import sqlalchemy
    from mlflow import MlflowClient
    from mlflow.store.db.utils import create_sqlalchemy_engine

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db").search_experiments()  # a store, made and migrated
    engine = create_sqlalchemy_engine(f"sqlite:///{tmp_path}/m.db")
    try:
        _thirdparty.upgrade_mlflow_db(engine)
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    except (ImportError, AttributeError) as exc:
        pytest.fail(_moved(f"mlflow.store.db.utils._upgrade_db ({exc})"))
    finally:
        engine.dispose()
    assert {"experiments", "runs", "alembic_version"} <= tables, _moved("mlflow.store.db.utils._upgrade_db")


def test_mlflow_package_scan_is_there():
    try:
        _thirdparty.scan_installed_packages()
    except (ImportError, AttributeError) as exc:
        pytest.fail(_moved(f"mlflow requirements_utils._init_packages_to_modules_map ({exc})"))


def test_mlflow_leaves_an_unchecked_python_models_predict_alone():
    def predict(self, context, model_input, params=None):
        return model_input

    model = type("Model", (_thirdparty.unchecked_python_model(),), {"predict": predict, "__module__": __name__})
    assert model.predict is predict, _moved("mlflow PythonModel._skip_type_hint_validation")
