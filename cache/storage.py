"""Where stores live: local paths and object-store URLs (s3://, gs://, any fsspec scheme).

A few functions over fsspec, which does the work: s3fs / gcsfs / adlfs talk to the store, and Zarr
v3's `FsspecStore` reads and writes arrays through them. A location is either a local path or a URL
(`is_url`); a URL is never turned into a `Path` (pathlib folds `s3://b/c` into the local path
`s3:/b/c`), and such a mangled string is refused rather than written to as a local folder.

Credentials and endpoints come from where the store's own library looks: for S3 the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3) and ~/.aws/config and ~/.aws/credentials; for GCS
GOOGLE_APPLICATION_CREDENTIALS or the gcloud login. The one explicit option is an endpoint URL
(`storage_options(endpoint_url=...)`, the `storage.endpoint_url` setting) for MinIO, R2 or a local
test server. Nothing here reads a credential from a run directory or a config file of ours, and
the options hold no secret, so a resolved config may record them.

Design note: staging and the completion marker on an object store
-----------------------------------------------------------------
A local store gets its guarantees from rename (temporary file, fsync, `os.replace`). An object
store has no rename, but it has something as good: one PUT of one object is atomic (readers see
the old object, or none, or the whole new one; a multipart upload becomes visible only when it
completes), and S3 and GCS give strong read-after-write and list-after-write consistency. So:

- Phase one stages one object per work unit, STORE/_staging/unit_000123.npz, serialized in
  memory and written by a single `write_bytes_atomic` (one PUT). A unit is whole or absent; a
  killed rank leaves no torn unit and no temporary object. Units are owned by u % world_size, so
  ranks on different machines never write the same object. Resume lists the staging prefix once
  (`list_prefix`) instead of one HEAD per unit; a unit staged twice (a rank killed after its PUT
  but before it logged) is rewritten with the same arrays.
- Phase two (rank 0 alone) writes the final Zarr arrays through `zarr_store`; every Zarr chunk is
  its own object written by one PUT, and rank 0 is its only writer, so chunk-aligned assembly
  cannot lose rows the way two writers of one chunk would.
- The completion marker is the `complete` attribute inside the group's `zarr.json`, one object.
  It is written by its own PUT after every array, the statistics and the rest of the manifest
  have been written and acknowledged. A reader that sees `complete: true` therefore sees every
  object written before it; a reader that races the writer sees `complete: false` or the old
  manifest, never a true one too early. Do not add consolidated metadata unless it is written
  after that PUT.
- Staging objects are deleted (`remove_tree`) after `complete` is set. A crash in between leaves
  stray `_staging/` objects in a complete store: readers ignore them, and a rerun (a no-op) may
  delete them.
- Replacing a store (`--overwrite`) cannot be atomic either: first PUT a `zarr.json` with
  `complete: false` (so no reader trusts the old store any more), then delete the rest. "A
  non-empty folder that is not a Zarr store" is, on an object store, a non-empty prefix with no
  `zarr.json` (`exists` and `list_prefix`).
- Run directories stay local (checkpoints rely on rename); a finished tokenizer folder is pushed
  with `upload_dir(..., last=("config.json",))`, so a reader that finds config.json finds the
  rest. Pushing over an existing tokenizer mixes old and new files while it runs: push to a new
  prefix instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from revq_pipe.pipeline.files import atomic_path

__all__ = ["StorageError", "is_url", "local_path", "join", "storage_options", "filesystem", "zarr_store",
           "exists", "read_bytes", "write_bytes_atomic", "list_prefix", "remove_tree", "upload_dir",
           "describe_failure", "check_access"]

# A scheme has two or more characters, so a Windows drive ("C:\\x", "C:/x") is never one; fsspec
# chains ("simplecache::s3://b/k") are URLs too.
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]+::)*[A-Za-z][A-Za-z0-9+.-]+://")
# "s3:/b/k" or "s3:": what pathlib leaves of "s3://b/k"; taken for neither a URL nor a local path.
_MANGLED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?:[/\\]|$)")
_ZARR_MODES = ("r", "r+", "a", "w", "w-")

Location = str | os.PathLike


class StorageError(Exception):
    """A location cannot be used: a mangled URL, an unknown scheme, a missing fsspec backend, or an object
    store that refuses or cannot be reached (the message names the URL, the cause and the fix)."""


def is_url(location: Location) -> bool:
    """True for "scheme://..." (s3://, gs://, file://, ...); local paths, "C:\\x" and "s3:/x" are not URLs."""
    return isinstance(location, str) and _URL.match(location) is not None


def local_path(location: Location) -> Path | None:
    """The local path a location names (a path or a file:// URL), or None for a remote URL."""
    text = _checked(location)
    if is_url(text):
        if "::" in text or not text.lower().startswith("file://"):
            return None
        return Path(LocalFileSystem._strip_protocol(text))
    return Path(text).absolute()


def join(location: Location, *names: str) -> str | Path:
    """location/names...: a URL stays a string joined with "/", a local path stays a Path."""
    text = _checked(location)
    if is_url(text):
        return "/".join([text.rstrip("/"), *(n.strip("/") for n in names)])
    return Path(text).joinpath(*names)


def storage_options(endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options from our settings: only an explicit endpoint (credentials come from the environment)."""
    if endpoint_url is None or endpoint_url == "":
        return {}
    if not re.match(r"^https?://[^/]", endpoint_url):
        raise StorageError(f"storage.endpoint_url={endpoint_url!r} is not an http(s) URL; pass e.g. "
                           "--set storage.endpoint_url=http://127.0.0.1:9000, or leave it unset to use "
                           "AWS_ENDPOINT_URL / the default endpoint")
    return {"endpoint_url": endpoint_url}


def filesystem(location: Location, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    text = _checked(location)
    if not is_url(text):
        return LocalFileSystem(), Path(text).absolute().as_posix()
    try:
        return fsspec.core.url_to_fs(text, **(options or {}))
    except (ImportError, ValueError, TypeError) as err:
        scheme = text.split("://", 1)[0]
        raise StorageError(f"cannot open {text}: {err}. The scheme {scheme!r} needs its fsspec backend "
                           "installed (s3:// -> s3fs, gs:// -> gcsfs, az:// -> adlfs) and options it "
                           f"accepts (given: {sorted(options or {})})") from err


def zarr_store(location: Location, mode: str = "r", options: dict[str, Any] | None = None
               ) -> LocalStore | FsspecStore:
    """The Zarr store to pass to `zarr.open_group(store, mode=mode)`: LocalStore or FsspecStore.

    Local paths and file:// URLs get a LocalStore (chunk writes go to a temporary file and are
    renamed). Anything else gets an FsspecStore; Zarr 3 needs an async filesystem and
    `FsspecStore.from_url` makes one (s3fs is async already; a sync backend is wrapped).
    """
    if mode not in _ZARR_MODES:
        raise ValueError(f"mode={mode!r}; use one of {_ZARR_MODES} (as for zarr.open_group)")
    read_only = mode == "r"
    path = local_path(location)
    if path is not None:
        return LocalStore(path, read_only=read_only)
    filesystem(location, options)  # a clear StorageError for an unknown scheme or a missing backend
    return FsspecStore.from_url(str(location), storage_options=options, read_only=read_only)


def exists(location: Location, options: dict[str, Any] | None = None) -> bool:
    """True if an object or file is there, or (on an object store) any object below that prefix."""
    fs, path = filesystem(location, options)
    with _reporting(location, options):
        fs.invalidate_cache(path)  # s3fs caches listings; another process or rank may have written since
        return fs.exists(path)


def read_bytes(location: Location, options: dict[str, Any] | None = None) -> bytes:
    """The whole content of one file or object (FileNotFoundError when absent)."""
    fs, path = filesystem(location, options)
    with _reporting(location, options):
        return fs.cat_file(path)


def open_for_reading(location: Location, options: dict[str, Any] | None = None, *, block_size: int = 2**18):
    """A seekable binary file over one file or object; on an object store each read fetches `block_size`
    bytes around it (one ranged GET), so reading a small part of a large object costs little."""
    fs, path = filesystem(location, options)
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb")
    with _reporting(location, options):
        return fs.open(path, "rb", block_size=block_size)


def write_bytes_atomic(location: Location, data: bytes | bytearray | memoryview,
                       options: dict[str, Any] | None = None) -> None:
    """Write one file or object so that readers see all of it or none of it."""
    fs, path = filesystem(location, options)
    if isinstance(fs, LocalFileSystem):
        # the project's one atomic local write: temporary file beside the target, fsync, rename
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    # An object store has no rename and needs none: a single PUT is atomic per object (a large
    # body goes up as a multipart upload, which also becomes visible only when it completes), and
    # there are no parent directories to create.
    with _reporting(location, options):
        fs.pipe_file(path, bytes(data))


def list_prefix(location: Location, options: dict[str, Any] | None = None) -> list[str]:
    """Sorted names of every file/object below location, relative to it ("a/b.npz"); [] when none."""
    fs, path = filesystem(location, options)
    fs.invalidate_cache(path)  # fresh listing: other ranks stage units while we run
    root = path.rstrip("/") + "/"
    try:
        with _reporting(location, options):
            found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(p[len(root):] for p in found if p.startswith(root))


def remove_tree(location: Location, options: dict[str, Any] | None = None) -> None:
    """Delete a folder or prefix and everything below it; nothing happens when it is absent."""
    fs, path = filesystem(location, options)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        if target.parent == target:
            raise StorageError(f"refusing to delete the filesystem root {location!s}")
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        return
    if "/" not in path.strip("/"):
        raise StorageError(f"refusing to delete the whole bucket {location!s}; name a prefix inside it")
    with _reporting(location, options):
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            fs.invalidate_cache(path)


def upload_dir(local_dir: Location, url: Location, options: dict[str, Any] | None = None,
               last: Sequence[str] = ()) -> list[str]:
    """Copy every file below local_dir to url/<relative name>; returns the relative names.

    `last` names files (relative to local_dir) uploaded only after all the others, e.g.
    ("config.json",) so that a reader that finds it finds a complete folder. Other files go up
    concurrently.
    """
    source = Path(local_dir)
    if not source.is_dir():
        raise StorageError(f"{source} is not a directory; nothing to upload to {url!s}")
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    missing = [n for n in last if n not in names]
    if missing:
        raise StorageError(f"{source} has no {missing}; cannot upload them last")
    fs, root = filesystem(url, options)
    for batch in ([n for n in names if n not in last], list(last)):
        if not batch:
            continue
        if isinstance(fs, LocalFileSystem):
            for name in batch:
                (Path(root) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, Path(root) / name)
        else:
            with _reporting(url, options):
                fs.put([str(source / n) for n in batch], [f"{root.rstrip('/')}/{n}" for n in batch])
    return names


# --- object-store failures as one line ---------------------------------------------------------------
# Backends raise their own types (botocore, aiohttp, google-auth) or s3fs's translations of them (FileNotFoundError,
# PermissionError); they are told apart by class names along the exception chain, so no backend is imported here.

_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ServerTimeoutError", "ConnectionRefusedError", "gaierror"}
_NO_BUCKET = {"NoSuchBucket"}
_ACCESS_DENIED = {"PermissionError", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_DEBUG_HINT = "--debug or REVQ_DEBUG=1 shows the traceback"


def describe_failure(error: BaseException, location: Location | None = None,
                     options: dict[str, Any] | None = None) -> str | None:
    """One line for a failure to use an object store (the URL, the cause, the fix), or None for any other error.

    The causes told apart: no credentials, endpoint unreachable, bucket missing, access denied. A plain
    FileNotFoundError (a key that is not there) is no failure of the store and gives None.
    """
    chain = _chain(error)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    url = str(location) if location is not None else "the object store"
    remote = location is not None and is_url(str(location))
    from_backend = remote or bool(names & {"BotoCoreError", "ClientError", "ClientConnectorError", "GoogleAuthError"})
    scheme = str(location).split("://", 1)[0].lower() if remote else "s3"
    if names & _NO_CREDENTIALS:
        cause, fix = "no credentials were found", _credentials_fix(scheme)
    elif names & _UNREACHABLE:
        endpoint = (options or {}).get("endpoint_url") or _endpoint_in(chain) or "the default endpoint"
        cause = f"the endpoint {endpoint} cannot be reached"
        fix = ("check --set storage.endpoint_url (or AWS_ENDPOINT_URL) and that the server is up and reachable "
               "from this machine")
    elif names & _NO_BUCKET or any("bucket does not exist" in str(e).lower() for e in chain):
        bucket = url.split("://", 1)[1].split("/", 1)[0] if remote else "named"
        cause = f"the bucket {bucket!r} does not exist"
        fix = f"create it (e.g. `aws s3 mb {scheme}://{bucket}`) or fix the URL"
    elif from_backend and names & _ACCESS_DENIED:
        cause = "access was denied"
        fix = "use credentials that may read and write there (AWS_PROFILE, AWS_ACCESS_KEY_ID, ...) or fix the URL"
    else:
        return None
    return f"cannot use {url}: {cause}; {fix} ({_DEBUG_HINT})"


def check_access(location: Location, options: dict[str, Any] | None = None) -> None:
    """StorageError (one line) when an object-store location cannot be used; a location with nothing there
    yet is fine, and local paths are not checked. One listing request, made before any heavy work."""
    if not is_url(os.fspath(location)):
        return
    text = os.fspath(location)
    pattern = re.search(r"[{*?\[]", text)
    probe = text[:pattern.start()].rsplit("/", 1)[0] if pattern else text  # a pattern: its fixed prefix
    fs, path = filesystem(probe, options)
    try:
        with _reporting(text, options):
            fs.ls(path, detail=False)
    except FileNotFoundError:
        pass  # nothing there yet (a store about to be written)
    finally:
        fs.invalidate_cache(path)  # the listing must not stand in for later, fresher ones


@contextlib.contextmanager
def _reporting(location: Location, options: dict[str, Any] | None) -> Iterator[None]:
    """Turn an object-store failure inside the block into a StorageError naming `location`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        message = describe_failure(error, location, options) if is_url(os.fspath(location)) else None
        if message is None:
            raise
        raise StorageError(message) from error


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _endpoint_in(chain: list[BaseException]) -> str | None:
    """The scheme://host[:port] a connection error names (botocore puts the whole request URL there)."""
    for error in chain:
        found = re.search(r"https?://[^/\s\"']+", str(error))
        if found:
            return found.group(0)
    return None


def _credentials_fix(scheme: str) -> str:
    if scheme in ("gs", "gcs"):
        return "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
    if scheme in ("az", "abfs", "abfss"):
        return "set AZURE_STORAGE_CONNECTION_STRING (or the account name and key)"
    return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"


def _checked(location: Location) -> str:
    """location as a string; StorageError for a URL mangled into a local path ("s3:/b/k")."""
    text = os.fspath(location)
    if not isinstance(text, str):
        raise TypeError(f"a location is a str or os.PathLike of str, got {location!r}")
    if not is_url(text):
        m = _MANGLED.match(text)
        if m and m.group(1).lower() in fsspec.available_protocols():
            raise StorageError(
                f"{text!r} looks like a {m.group(1)}:// URL whose '//' was collapsed (a URL passed "
                f"through pathlib.Path?); write {m.group(1)}://... for object storage, or ./{text} for a "
                "local folder of that name")
    return text
