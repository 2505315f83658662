"""The tags ich_tune puts on MLflow runs, experiments and model versions: one place, so that a search
writes and `report`, `--model` and the registry read the same names."""

TAG_SEARCH_DIR = "ich_tune.search_dir"  # on a search's parent run: its Ray experiment folder
TAG_SEARCH_FILE = "ich_tune.search_file"  # ... the search file it ran
TAG_SEARCH = "ich_tune.search"  # ... and the search's name
TAG_BEST_TRIAL = "ich_tune.best_trial"  # ... once it ends: the id of its best trial
TAG_BEST_CHECKPOINT = "ich_tune.best_checkpoint"  # ... and where that trial's checkpoint is
TAG_TRIAL_ID = "ich_tune.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_ENDED = "ich_tune.ended"  # on a trial's run: finished, stopped early, diverged or error
TAG_MESSAGE = "ich_tune.message"  # ... why it diverged or failed (or, while it runs, its last crash)
TAG_RESTARTS = "ich_tune.restarts"  # how often a crashed trial was restarted from its checkpoint
TAG_METRIC = "ich_tune.metric"  # the metric the search optimised, on its parent run
TAG_MODE = "ich_tune.mode"  # ... and whether higher (max) or lower (min) is better
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TAG_DESCRIPTION = "mlflow.note.content"  # what MLflow's UI shows as a run's description
TAG_NODE = "ich_tune.node_id"  # the Ray node training a trial (it changes when a restart moves it)
TAG_VALUE = "ich_tune.value"  # on a model version: the best value of the search's metric
TAG_DATA = "ich_tune.data_fingerprint"  # ... and the fingerprint of the validation data (data/fingerprint.py)
TAG_VERSUS_BEST = "ich_tune.versus_best"  # on a trial's run: tied, worse or better than the best (bootstrap)
