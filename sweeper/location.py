"""Where a results store lives, and the few file operations the store needs there (docs/store.md).

A local folder (:class:`Local`) or an object store URI (:class:`ObjectStore`: ``s3://bucket/prefix``,
``gs://bucket/prefix``). Every operation the store's guarantees rest on is here and nowhere else: a data file written
whole under a name nobody reads yet, an exclusive create (the commit), an ``lstat`` before any open (so a FIFO, a
device or a link is never opened), and an open that can neither follow a link nor block.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from pathlib import Path

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def work_dir(location: str) -> Path:
    """The launching machine's own working folder for a results URI: trial claims, Tune's experiment folder, the
    events timeline, warm workers' logs, a local copy of KL references and the calibrated / ONNX cache. Nothing a
    reader of the results needs is here (docs/store.md, "Object stores")."""
    base = os.environ.get("SWEEPER_WORK_DIR") or Path.home() / ".cache" / "sweeper" / "work"
    return Path(base) / hashlib.sha256(location.encode()).hexdigest()[:16]


def arrow_reader(data: bytes):
    """An Arrow reader over a copy of ``data`` in memory Arrow owns: what a location hands the Parquet reader (the
    callers check the size against the limits first). A reader over Python bytes (the bytes object itself, or a
    Python file object's reads) makes the Parquet reader's pool threads free them, which needs the GIL: one that did
    so while the interpreter was exiting aborted the process ("terminate called without an active exception",
    SIGABRT; `sweep results` with a damaged file: 4 and 2 exits of 80 on the S3 and GCS emulators, 14 of 80 on a
    folder, none after: benchmarks/exit_abort_probe.py; gdb and a core dump showed arrow::py::PyBuffer's destructor
    on an Arrow pool thread)."""
    import pyarrow as pa

    owned = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(owned).write(data)
    return pa.BufferReader(owned)


class Local:
    """A results folder on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike):
        if is_uri(root):
            raise UserError(f"results location {root}: a URI, not a folder (open_location opens either)")
        self.root = Path(root)
        self.work = self.root  # the launching machine's working state lives in the folder itself
        self.storage_options = None

    def __str__(self) -> str:
        return str(self.root)

    @property
    def canonical(self) -> str:
        """The location as other processes of this machine open it (whatever their working directory)."""
        return str(self.root.resolve())

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self) -> bool:
        return self.root.is_dir()

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):  # a file where a folder of the path should be
            return None

    def is_real_dir(self, rel: str) -> bool:
        """``rel`` is a directory of this location, not a link to one elsewhere."""
        st = self.lstat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def open_regular(self, rel: str):
        """The whole of ``rel`` as an Arrow reader over memory Arrow owns (arrow_reader: through a Python file
        object, `sweep results` on a folder with a damaged file aborted as it exited too)."""
        return arrow_reader(self.read_bytes(rel))

    def read_bytes(self, rel: str) -> bytes:
        """The whole of ``rel``, refusing links (O_NOFOLLOW) and anything but a regular file without blocking on it
        (O_NONBLOCK: a FIFO would otherwise wait for a writer forever)."""
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.root / rel} is not a regular file")
            os.set_blocking(fd, True)
            return fh.read()

    def list(self, rel: str) -> list[str]:
        """Names in folder ``rel`` ([] if it does not exist)."""
        try:
            return [e.name for e in os.scandir(self.root / rel)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _fsync_dir(self, folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_fd(self, path: Path, data: bytes, flags: int) -> None:
        fd = os.open(path, flags | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_UMASK)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_new(self, rel: str, data: bytes, sync_dir: bool = True) -> None:
        """Write a file under a fresh name (nothing refers to it until a commit names it). Fsynced; its folder too
        unless ``sync_dir`` is False (the caller then calls :meth:`sync_dir` once for several files)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_fd(path, data, os.O_CREAT | os.O_EXCL)
        if sync_dir:
            self._fsync_dir(path.parent)

    def sync_dir(self, rel: str) -> None:
        self._fsync_dir(self.root / rel)

    def _temp(self, rel: str, data: bytes) -> tuple[Path, Path]:
        """(final path, a fsynced temporary file beside it holding ``data``)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        self._write_fd(tmp, data, os.O_CREAT | os.O_EXCL)
        return path, tmp

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data``, whole or not at all; False if it exists already (another commit won)."""
        path, tmp = self._temp(rel, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists: the commit point
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        self._fsync_dir(path.parent)
        return True

    def replace(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically (temporary name, fsync, rename, fsync of the folder)."""
        path, tmp = self._temp(rel, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._fsync_dir(path.parent)

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self.root / rel)
        except FileNotFoundError:
            pass

    def move(self, rel: str, dest_rel: str) -> None:
        dest = self.root / dest_rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / rel, dest)
        self._fsync_dir(dest.parent)


class LocationError(UserError):
    """The location cannot be reached or used (no such bucket, no credentials or permission, the network): never
    taken for a damaged file (that would quarantine good results), always the command's one-line error."""


def _guard(method):
    """``method`` of an ObjectStore with the client's failures (its ``CLIENT_MODULES``' errors, pyarrow's OSErrors) as
    a LocationError naming the location; a missing object stays FileNotFoundError."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (FileNotFoundError, UserError):
            raise
        except Exception as e:  # noqa: BLE001 - classified just below; anything else goes on as it is
            if not (isinstance(e, OSError) or type(e).__module__.startswith(self.CLIENT_MODULES)):
                raise
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LocationError(f"results location {self.root}: cannot use it ({why}); check the bucket, the "
                                f"credentials {self.CREDENTIALS}") from None
    return guarded


class ObjectStore:
    """A results location on an object store: ``s3://bucket/prefix`` (:class:`S3Store`) or ``gs://bucket/prefix``
    (:class:`GcsStore`).

    What every object store shares is here: stats and copies through pyarrow's filesystem (what Ray Tune's
    storage_path uses), reads of whole objects, the probe of conditional writes, quarantine by copy and delete. A
    subclass is the small protocol-specific part: its pyarrow filesystem and client, and single requests for writes,
    whole-object reads, listings and deletes, among them the two conditional writes the store's guarantees rest on,
    which pyarrow cannot send: :meth:`put_if` creates an object only if it does not exist (the commit) or replaces it
    only if it is still the version this writer saw (the launch lease). A single put is whole or absent (there is no
    partial object), so a data file needs no temporary name. There are no links, FIFOs or devices; a "folder" is a
    key prefix. Credentials come from the usual environment and config of that store; nothing of them is stored."""

    SCHEME = ""
    CLIENT_MODULES: tuple[str, ...] = ()  # modules whose exceptions are the client's failures (a LocationError)
    CREDENTIALS = ""  # where the credentials and another endpoint come from, for the error message
    CONDITION = ""  # the create-only-if-absent condition, as the probe's refusal names it
    SERVERS = ""  # servers known to honour it

    def __init__(self, uri: str):
        scheme, _, rest = str(uri).partition("://")
        bucket, _, prefix = rest.strip("/").partition("/")
        if scheme != self.SCHEME or not bucket:
            raise UserError(f"results location {uri}: give a folder path, {_SUPPORTED}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"{scheme}://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.work = work_dir(self.root)
        self.storage_options = self._storage_options()  # for Polars, which reads the location itself
        self._fs = None
        self._client = None

    def __str__(self) -> str:
        return self.root

    def __getstate__(self) -> dict:  # the clients are made again where it is unpickled (Tune pickles its callbacks)
        return {**self.__dict__, "_fs": None, "_client": None}

    @property
    def canonical(self) -> str:
        return self.root

    @property
    def fs(self):
        if self._fs is None:
            try:
                self._fs = self._open_fs()
            except (OSError, ValueError) as e:
                raise UserError(f"results location {self.root}: cannot open it ({str(e).splitlines()[0]})") from None
        return self._fs

    @property
    def client(self):
        if self._client is None:
            self._client = self._open_client()
        return self._client

    def _storage_options(self) -> dict | None:
        raise NotImplementedError

    def _open_fs(self):
        raise NotImplementedError

    def _open_client(self):
        raise NotImplementedError

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _fs_path(self, rel: str) -> str:
        return f"{self.bucket}/{self._key(rel)}".rstrip("/")

    def _list_prefix(self, rel: str) -> str:
        """The key prefix of "folder" ``rel``, ending in "/" (or "" for the root of a bucket)."""
        return self._key(rel).rstrip("/") + "/" if rel else (self.prefix + "/" if self.prefix else "")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def ensure(self) -> None:
        pass  # a prefix exists once a key is under it

    @_guard
    def exists(self) -> bool:
        return bool(self.list(""))

    @_guard
    def lstat(self, rel: str) -> os.stat_result | None:
        from pyarrow import fs

        info = self.fs.get_file_info(self._fs_path(rel))
        if info.type == fs.FileType.NotFound:
            return None
        mode = stat.S_IFDIR | 0o755 if info.type == fs.FileType.Directory else stat.S_IFREG | 0o644
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return os.stat_result((mode, 0, 0, 1, 0, 0, info.size or 0, mtime, mtime, mtime))

    @_guard
    def open_regular(self, rel: str):
        """The whole object, read in one request, as an Arrow reader (arrow_reader): a network failure is then a
        LocationError here, never a read error inside the Parquet reader that validation would take for a damaged
        file. Callers open an object only after its size was checked against the limits."""
        return arrow_reader(self.read_bytes(rel))

    @_guard
    def read_bytes(self, rel: str) -> bytes:
        got = self.get_with_etag(rel)
        if got is None:
            raise FileNotFoundError(self.path(rel))
        return got[0]

    def list(self, rel: str) -> list[str]:
        """Names directly in "folder" ``rel``: objects and the prefixes of deeper ones ([] if none)."""
        raise NotImplementedError

    def is_real_dir(self, rel: str) -> bool:
        """A key prefix with keys under it: an object store has no links, and a key named like a folder does not
        hide the keys under that folder, so there is nothing else to tell apart."""
        raise NotImplementedError

    def write_new(self, rel: str, data: bytes, sync_dir: bool = True) -> None:
        """One unconditional put (whole or absent)."""
        raise NotImplementedError

    def sync_dir(self, rel: str) -> None:
        pass  # a completed put is durable

    def put_if(self, rel: str, data: bytes, etag: str | None) -> str | None:
        """Write ``rel`` only if it does not exist (``etag`` None) or is still the version ``etag``: the new
        version's tag, or None when another writer got there first."""
        raise NotImplementedError

    def get_with_etag(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and the tag of that very version (for :meth:`put_if`), or None if it does not exist."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Delete ``rel`` (no error if it does not exist)."""
        raise NotImplementedError

    @_guard
    def check_conditional_writes(self) -> None:
        """UserError unless the server refuses a second create-only-if-absent put of one key: a server that ignores
        the condition would let two commits take one sequence number."""
        import uuid

        rel = f"_probe/{uuid.uuid4().hex}"
        try:
            if self.put_if(rel, b"1", None) is None or self.put_if(rel, b"2", None) is not None:
                raise UserError(f"results location {self.root}: the server ignores conditional writes "
                                f"({self.CONDITION}), which the store's commits need to be exclusive; use "
                                f"{self.SERVERS}")
        finally:
            self.delete(rel)

    @_guard
    def create_exclusive(self, rel: str, data: bytes) -> bool:
        return self.put_if(rel, data, None) is not None

    @_guard
    def replace(self, rel: str, data: bytes) -> None:
        self.write_new(rel, data)  # a put replaces the key whole

    @_guard
    def download_tree(self, rel: str, dest: Path, last: str) -> None:
        """Every object under "folder" ``rel`` into local folder ``dest`` (multipart for large ones), the object
        named ``last`` (relative to ``rel``) last."""
        from pyarrow import fs

        base = self._fs_path(rel)
        infos = self.fs.get_file_info(fs.FileSelector(base, recursive=True))
        local = fs.LocalFileSystem()
        for info in sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path == f"{base}/{last}"):
            target = dest / info.path[len(base) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.copy_files(info.path, str(target), source_filesystem=self.fs, destination_filesystem=local)

    @_guard
    def upload_tree(self, folder: Path, rel: str, last: str) -> None:
        """Every file under local ``folder`` to "folder" ``rel`` of this location, the file named ``last`` last."""
        from pyarrow import fs

        local = fs.LocalFileSystem()
        for p in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p == folder / last):
            fs.copy_files(str(p), self._fs_path(f"{rel}/{p.relative_to(folder).as_posix()}"),
                          source_filesystem=local, destination_filesystem=self.fs)

    @_guard
    def move(self, rel: str, dest_rel: str) -> None:
        """Copy, then delete: an object store has no rename (a crash between the two leaves both; the copy is in
        quarantine/ and never read as results, the original is found damaged again and moved again)."""
        self.fs.copy_file(self._fs_path(rel), self._fs_path(dest_rel))
        self.delete(rel)


class S3Store(ObjectStore):
    """``s3://bucket/prefix``: AWS S3 or any S3-compatible server, through boto3. The commit is a ``PutObject`` with
    ``If-None-Match: *`` (S3 answers 412 to every other writer), the lease's rewrite one with ``If-Match: <its
    ETag>``; pyarrow's ``S3FileSystem`` has neither, and its output stream takes three requests (a multipart upload)
    where one ``PutObject`` does. Credentials: the usual AWS environment and config (``AWS_*`` variables, ``~/.aws``,
    ``AWS_ENDPOINT_URL`` for another server)."""

    SCHEME = "s3"
    CLIENT_MODULES = ("botocore", "boto3")
    CREDENTIALS = "(AWS_* variables, ~/.aws) and AWS_ENDPOINT_URL"
    CONDITION = "If-None-Match: *"
    SERVERS = "AWS S3 or a server that implements them (MinIO, R2)"

    def _storage_options(self) -> dict | None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # the same endpoint; credentials from the environment
        return ({"aws_endpoint_url": endpoint, "aws_allow_http": str(endpoint.startswith("http:")).lower()}
                if endpoint else None)

    def _open_fs(self):
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.root)[0]

    def _open_client(self):
        try:
            import boto3
        except ImportError:
            raise UserError(f"results location {self.root}: needs boto3 (pip install 'sweeper[s3]')") from None
        return boto3.client("s3")

    @_guard
    def is_real_dir(self, rel: str) -> bool:
        r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._list_prefix(rel), MaxKeys=1)
        return bool(r.get("KeyCount"))

    @_guard
    def list(self, rel: str) -> list[str]:
        prefix = self._list_prefix(rel)
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                         Delimiter="/"):
            names += [o["Key"][len(prefix):] for o in page.get("Contents", []) if o["Key"] != prefix]
            names += [c["Prefix"][len(prefix):].rstrip("/") for c in page.get("CommonPrefixes", [])]
        return names

    @_guard
    def write_new(self, rel: str, data: bytes, sync_dir: bool = True) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    @_guard
    def put_if(self, rel: str, data: bytes, etag: str | None) -> str | None:
        """(412; 409: a concurrent conditional write to the same key)"""
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **cond)["ETag"]
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return None
            raise

    @_guard
    def get_with_etag(self, rel: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return r["Body"].read(), r["ETag"]

    @_guard
    def delete(self, rel: str) -> None:
        # boto3, not pyarrow: pyarrow's delete_file leaves an empty "folder/" marker object behind (deleting a key
        # that does not exist is no error either way)
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))


class GcsStore(ObjectStore):
    """``gs://bucket/prefix``: Google Cloud Storage, through its JSON API (google-cloud-storage). An object's version
    is its generation: the commit is an upload with ``ifGenerationMatch=0`` (created only if absent), the lease's
    rewrite one with ``ifGenerationMatch=<generation it wrote last>``; GCS answers 412 to the loser. pyarrow's
    ``GcsFileSystem`` has no preconditions. Credentials: Google's application default credentials
    (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, a VM's service account);
    ``STORAGE_EMULATOR_HOST`` points every client (this one, pyarrow's, Polars') at an emulator instead."""

    SCHEME = "gs"
    CLIENT_MODULES = ("google.", "requests", "urllib3")
    CREDENTIALS = "(GOOGLE_APPLICATION_CREDENTIALS, gcloud's application default) and STORAGE_EMULATOR_HOST"
    CONDITION = "ifGenerationMatch=0"
    SERVERS = "Google Cloud Storage or an emulator that implements them (fake-gcs-server)"
    RETRY_S = 20  # how long a request is retried (network errors, 429, 5xx) before the location is unreachable

    @staticmethod
    def _emulator() -> str | None:
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        return (host if "://" in host else f"http://{host}") if host else None

    def _storage_options(self) -> dict | None:
        emulator = self._emulator()
        if not emulator:
            return None  # Polars finds the application default credentials itself
        # Polars (object_store) has no emulator variable: its base URL comes in a service-account key without a key
        return {"google_service_account_key": json.dumps({"gcs_base_url": emulator, "disable_oauth": True,
                                                          "client_email": "", "private_key": "",
                                                          "private_key_id": ""})}

    def _open_fs(self):
        from datetime import timedelta

        from pyarrow import fs

        limit = {"retry_time_limit": timedelta(seconds=self.RETRY_S)}
        emulator = self._emulator()
        if emulator:
            scheme, _, host = emulator.partition("://")
            return fs.GcsFileSystem(endpoint_override=host.rstrip("/"), scheme=scheme, anonymous=True, **limit)
        return fs.GcsFileSystem(**limit)

    def _open_client(self):
        try:
            from google.cloud import storage
        except ImportError:
            raise UserError(f"results location {self.root}: needs google-cloud-storage (pip install "
                            "'sweeper[gcs]')") from None
        return storage.Client()  # anonymous, for no project, when STORAGE_EMULATOR_HOST is set

    @property
    def _retry(self):
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(self.RETRY_S)

    def _blob(self, rel: str):
        return self.client.bucket(self.bucket).blob(self._key(rel))

    @_guard
    def is_real_dir(self, rel: str) -> bool:
        it = self.client.list_blobs(self.bucket, prefix=self._list_prefix(rel), max_results=1, retry=self._retry)
        return any(True for _ in it)

    @_guard
    def list(self, rel: str) -> list[str]:
        prefix = self._list_prefix(rel)
        it = self.client.list_blobs(self.bucket, prefix=prefix, delimiter="/", retry=self._retry)
        names = [b.name[len(prefix):] for b in it if b.name != prefix]  # consumes every page: prefixes are filled
        return names + [p[len(prefix):].rstrip("/") for p in it.prefixes]

    @_guard
    def write_new(self, rel: str, data: bytes, sync_dir: bool = True) -> None:
        self._blob(rel).upload_from_string(data, content_type="application/octet-stream", retry=self._retry)

    @_guard
    def put_if(self, rel: str, data: bytes, etag: str | None) -> str | None:
        """(412 Precondition Failed)"""
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob(rel)
        try:
            blob.upload_from_string(data, content_type="application/octet-stream",
                                    if_generation_match=0 if etag is None else int(etag), retry=self._retry)
        except PreconditionFailed:
            return None
        return str(blob.generation)

    @_guard
    def get_with_etag(self, rel: str) -> tuple[bytes, str] | None:
        from google.api_core.exceptions import NotFound

        blob = self._blob(rel)
        try:
            data = blob.download_as_bytes(retry=self._retry)
        except NotFound:  # (a missing bucket is found by the listing or the first write, which name it)
            return None
        return data, str(blob.generation)  # from the download's own x-goog-generation: the version read

    @_guard
    def delete(self, rel: str) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self._blob(rel).delete(retry=self._retry)
        except NotFound:
            pass


_STORES = {cls.SCHEME: cls for cls in (S3Store, GcsStore)}
_SUPPORTED = ("s3://bucket/prefix or gs://bucket/prefix (an object store needs an exclusive create for the commit "
              "and a compare-and-swap for the launch lease: S3's and GCS's conditional writes; other filesystems "
              "pyarrow or fsspec open, such as hdfs://, offer neither)")


def open_location(root: str | os.PathLike) -> Local | ObjectStore:
    if not is_uri(root):
        return Local(root)
    scheme = str(root).partition("://")[0]
    if scheme not in _STORES:
        raise UserError(f"results location {root}: give a folder path, {_SUPPORTED}")
    return _STORES[scheme](str(root))
