"""Where a search keeps its trial folders and checkpoints: a local or NFS folder, or any URI that Ray
and pyarrow write to (`s3://bucket/prefix?endpoint_override=...`, `gs://...`).

Ray reads and writes it from every node through pyarrow; ich_tune only names places in it and asks
whether they exist. What has to stay on the driver's own disk (the run lock, the default SQLite MLflow
store, downloaded init weights) lives in a local folder: the storage folder itself when it is local.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs

from ich_tune.errors import ConfigError

DEFAULT_LOCAL_DIR = Path("~/.cache/ich_tune")  # for a URI storage, unless --local-dir says otherwise


def is_uri(location: str) -> bool:
    """True for `s3://`, `gs://`, ...; False for a plain path or `file://`."""
    scheme = urlsplit(location).scheme
    return len(scheme) > 1 and scheme != "file"


def normalize(storage: str) -> str:
    """A URI as given, a path (or `file://` URI) made absolute: Ray's workers run in other folders."""
    if is_uri(storage):
        filesystem(storage)  # a bad scheme or option is reported now, not by Ray in a traceback
        return storage.rstrip("/")
    path = urlsplit(storage).path if storage.startswith("file://") else storage
    return str(Path(path).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """`location/part/...`; a URI keeps its query (`?endpoint_override=...`) at the end."""
    if not is_uri(location):
        return str(Path(location, *parts))
    url = urlsplit(location)
    return urlunsplit(url._replace(path=posixpath.join(url.path or "/", *parts)))


def parent(location: str) -> str:
    if not is_uri(location):
        return str(Path(location).parent)
    url = urlsplit(location)
    return urlunsplit(url._replace(path=posixpath.dirname(url.path.rstrip("/"))))


def name_of(location: str) -> str:
    return posixpath.basename(urlsplit(location).path if is_uri(location) else location)


def filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's filesystem for `location` and the path on it, as Ray resolves them."""
    try:
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowException, ValueError, OSError) as err:
        raise ConfigError(f"storage '{location}': {err}. Give a folder, or a URI such as "
                          "s3://bucket/prefix (options after ?: ?endpoint_override=HOST:PORT&scheme=http)."
                          ) from None


def refused(location: str, doing: str, err: OSError) -> ConfigError:
    """One message for a storage that cannot be read or written (a missing permission, a bucket's
    AccessDenied, no credentials), instead of pyarrow's traceback."""
    return ConfigError(f"storage '{location}': cannot {doing} there ({err}). Check the path or bucket and "
                       "the credentials (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...).")


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except OSError as err:
        raise refused(location, "read", err) from None


def children(location: str) -> list[str]:
    """The folders directly inside `location`, as locations, sorted by name; none if it is absent."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise refused(location, "read", err) from None
    names = sorted(posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return [join(location, name) for name in names]


def can_restore(location: str) -> bool:
    """Whether `location` holds a search's state that Ray Tune can resume."""
    from ray import tune

    try:
        return tune.Tuner.can_restore(location)
    except OSError as err:
        raise refused(location, "read", err) from None


def check_writable(location: str) -> None:
    """Creates `location`, or says which storage cannot be written and why, before Ray starts."""
    fs, path = filesystem(location)
    try:
        fs.create_dir(path)
    except OSError as err:
        raise refused(location, "write", err) from None


def local_root(storage: str, local_dir: Path | None) -> Path:
    """The driver's own folder: --local-dir, else the storage folder, else ~/.cache/ich_tune."""
    if local_dir is not None:
        return local_dir.expanduser().resolve()
    return DEFAULT_LOCAL_DIR.expanduser() if is_uri(storage) else Path(storage)
