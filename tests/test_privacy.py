"""Nothing phones home: MLflow's telemetry and Ray's usage stats are off unless the user turns them on."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port

# A user's plain shell: MLflow stays quiet by itself under pytest or CI (PYTEST_CURRENT_TEST, CI, ...)
# and where the privacy variables are set, so the probe gets none of those.
KEPT = ("PATH", "HOME", "LANG", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# Asks MLflow's and Ray's own functions, in this process and inside a Ray Tune trial on a Ray that
# ich_tune started, whether they would report anything.
PROBE = """
import json, sys
import ich_tune.cli  # what `python -m ich_tune` and `ich-tune` import first
from ray import tune

from ich_tune.search.cluster import start_ray


def enabled():
    from mlflow.telemetry.utils import is_telemetry_disabled
    from ray._common.usage.usage_lib import usage_stats_enabled

    return {"mlflow_telemetry": not is_telemetry_disabled(), "ray_usage_stats": usage_stats_enabled()}


def trial(config):
    tune.report(enabled())


if __name__ == "__main__":
    driver = enabled()
    start_ray(num_gpus=0, dashboard_port=int(sys.argv[1]))
    result = tune.Tuner(trial, tune_config=tune.TuneConfig(num_samples=1)).fit()[0].metrics
    print(json.dumps({"driver": driver, "trial": {k: result[k] for k in driver}}))
"""


def probe(tmp_path, **env) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    clean = {k: v for k, v in os.environ.items() if k in KEPT}
    done = subprocess.run([sys.executable, str(script), str(free_port())], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**clean, "RAY_AUTH_MODE": "disabled", **env},
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_telemetry_is_off_in_the_cli_and_in_trial_workers(tmp_path):
    seen = probe(tmp_path)
    off = {"mlflow_telemetry": False, "ray_usage_stats": False}
    assert seen == {"driver": off, "trial": off}


@pytest.mark.slow
def test_a_user_who_asks_for_telemetry_gets_it(tmp_path):
    seen = probe(tmp_path, MLFLOW_DISABLE_TELEMETRY="false", RAY_USAGE_STATS_ENABLED="1")
    on = {"mlflow_telemetry": True, "ray_usage_stats": True}
    assert seen == {"driver": on, "trial": on}
