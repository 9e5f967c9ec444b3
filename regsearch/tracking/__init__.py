"""MLflow tracking: an experiment per study, one parent run shared by all workers, a child run per trial.

A study talks to MLflow through one port, `Tracking`, got from `open_tracking`. For `optimize` it is a
`TrackerProcess`: a `LocalTracking` runs in a child process, so importing MLflow, creating (migrating) a new
store, every call to the store and logging the best model run on another core while the study prepares data and
trains (threads would not do: MLflow's work is Python that holds the GIL the training loop needs). `confirm` and
`sync` use a `LocalTracking` in their own process. Per-epoch metrics are buffered and sent in batches, so that
logging never waits on the store.

A tracking failure is a warning, never a crashed study: when the store stops answering, logging pauses (a
background probe asks again every few seconds) and the trials finished meanwhile are logged from the Optuna
storage once it answers (`sync_runs`), or later by `regsearch sync`.
"""

from regsearch.tracking._local import LocalTracking
from regsearch.tracking._parent import log_to_parent_run
from regsearch.tracking._port import Tracking, open_tracking
from regsearch.tracking._process import TrackerProcess
from regsearch.tracking._store import (
                                       check_tracking_uri,
                                       default_tracking_uri,
                                       error_gist,
                                       local_store_problem,
                                       sqlite_path,
)
from regsearch.tracking._sync import SyncReport, sync_runs

__all__ = ["LocalTracking", "SyncReport", "TrackerProcess", "Tracking", "check_tracking_uri",
           "default_tracking_uri", "error_gist", "local_store_problem", "log_to_parent_run", "open_tracking",
           "sqlite_path", "sync_runs"]
