"""ich_tune: hyperparameter search for intracranial-hemorrhage classifiers on head CT.

Patient data stay where they are, and so does everything about them: MLflow's telemetry and Ray's
usage stats are off in every process that imports ich_tune (the CLI, and the Ray workers that run
its trials), unless the user has set these variables already.
"""

import os

__version__ = "0.1.0"

PRIVATE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
for _name, _value in PRIVATE_ENV.items():
    os.environ.setdefault(_name, _value)
