"""ich_tune: hyperparameter search for intracranial-hemorrhage classifiers on head CT."""

__version__ = "0.1.0"
