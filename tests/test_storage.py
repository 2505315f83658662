"""Storage locations: folders and URIs named, checked and locked without starting Ray."""

import os

import pytest

from ich_tune.errors import ConfigError, UserError
from ich_tune.search import storage
from ich_tune.search.run_folder import run_lock
from ich_tune.tracking.client import ui_hint

BUCKET = "s3://bucket/searches?endpoint_override=127.0.0.1:9000&scheme=http"


def test_a_uri_keeps_its_options_after_the_path():
    run = storage.join(BUCKET, "demo", "20261127-101500")
    assert run == "s3://bucket/searches/demo/20261127-101500?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.parent(run) == "s3://bucket/searches/demo?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.name_of(run) == "20261127-101500"


def test_a_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs") == str(tmp_path / "runs")
    assert storage.normalize(f"file://{tmp_path}/runs/") == str(tmp_path / "runs")
    run = storage.join(storage.normalize("runs"), "demo", "r")
    assert storage.parent(run) == str(tmp_path / "runs" / "demo") and storage.name_of(run) == "r"
    assert run == str(tmp_path / "runs" / "demo" / "r")
    assert storage.local_root(storage.normalize("runs"), None) == tmp_path / "runs"
    assert storage.local_root(BUCKET, tmp_path / "local") == tmp_path / "local"


@pytest.mark.parametrize("uri, why", [("ftp://host/runs", "Unrecognized filesystem type"),
                                      ("s3://bucket/runs?endpoint=x", "Unexpected query parameter")])
def test_a_storage_pyarrow_cannot_open_is_one_message(uri, why):
    with pytest.raises(ConfigError, match=rf"^storage '{uri.replace('?', '[?]')}': .*{why}.*s3://bucket/prefix"):
        storage.normalize(uri)


def test_a_storage_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=f"storage '{tmp_path}/file/demo': cannot write there"):
        storage.check_writable(str(tmp_path / "file" / "demo"))
    storage.check_writable(str(tmp_path / "runs" / "demo"))
    assert storage.exists(str(tmp_path / "runs" / "demo"))
    assert storage.children(str(tmp_path / "runs")) == [str(tmp_path / "runs" / "demo")]
    assert storage.children(str(tmp_path / "absent")) == []


def test_the_run_lock_of_a_uri_lives_on_this_machine(tmp_path):
    run = storage.join(BUCKET, "demo", "r")
    with run_lock(run, tmp_path / "locks"):
        assert len(list((tmp_path / "locks").iterdir())) == 1
        with pytest.raises(UserError, match=rf"another `run` \(pid {os.getpid()}\)"), \
                run_lock(run, tmp_path / "locks"):
            pass
        with run_lock(storage.join(BUCKET, "demo", "other"), tmp_path / "locks"):  # another run is free
            pass


def test_run_with_a_bad_storage_flag_exits_2_with_one_line(tiny_rsna, tmp_path, capsys):
    from ich_tune.cli import main
    from tests.conftest import write_space

    space = write_space(tmp_path, tiny_rsna)
    assert main(["run", str(space), "--storage", "ftp://host/runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: storage 'ftp://host/runs': ") and err.count("\n") == 1


def test_an_unwritable_storage_folder_is_one_message_before_the_lock(tmp_path, capsys):
    """Before the run lock is taken there: a folder this user may not write, and a run lock in a
    search folder made read-only after an earlier run."""
    from ich_tune.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(f"experiment: {{data: {{root: {tmp_path}}}}}\nnum_train_steps: 5\n")
    (tmp_path / "readonly").mkdir(0o500)
    (tmp_path / "old" / "space").mkdir(0o500, parents=True)
    if os.access(tmp_path / "readonly", os.W_OK):
        pytest.skip("this user writes read-only folders (root)")
    assert main(["run", str(space), "--storage", str(tmp_path / "readonly")]) == 2
    assert f"error: storage '{tmp_path}/readonly/space': cannot write there" in capsys.readouterr().err
    assert main(["run", str(space), "--storage", str(tmp_path / "old"), "--name", "r"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/old/space/r: cannot write its lock file")


def test_a_bucket_that_cannot_be_reached_is_one_message(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    closed = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens on port 9
    with pytest.raises(ConfigError, match=r"^storage 's3://bucket/runs[?].*': cannot read there \(.*AWS_"):
        storage.exists(closed)
    with pytest.raises(ConfigError, match="cannot read there"):
        storage.children(closed)


def test_the_hint_opens_a_server_or_runs_mlflow_ui():
    assert ui_hint("http://mlflow.lab:5000/", "3") == "open http://mlflow.lab:5000/#/experiments/3/runs"
    assert ui_hint("sqlite:////data/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////data/mlflow.db"
