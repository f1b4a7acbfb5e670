"""One bucket prefix of an S3-compatible object store, as the checkpoint code uses it: listing,
small objects (manifests, the writer lease), parallel multipart transfers of files, deletes.

Every operation goes through one boto3 client built from `S3Options` (credentials from the
usual places unless given: the environment, AWS_PROFILE and ~/.aws, instance metadata).
Retries are botocore's "standard" mode: throttling (SlowDown, 503), 5xx answers, timeouts and
dropped or refused connections are retried with backoff, up to `max_attempts` per request; a
multipart transfer retries each part on its own. Every S3 request pyengine makes may be
repeated safely: PUTs and DELETEs of whole objects are idempotent, and the conditional PUTs of
the writer lease check who owns the lease after a 412 (writer_lease.py). 403 and 404 are not
retried, as waiting cannot fix them. Whatever still fails is raised as a built-in OSError
subclass that names the object's URL and says what to do (`translated`). Nothing here logs,
and no message carries a credential.
"""

from __future__ import annotations

import email.utils
import errno
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

MIN_PART_BYTES = 5 << 20  # S3's smallest multipart part (all but the last)
MAX_PART_BYTES = 5 << 30
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")  # S3 needs 3+ characters; others allow '_'
_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled", "AccountProblem", "Forbidden", "403"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "RequestThrottled", "ServiceUnavailable", "503"}


@dataclass(frozen=True)
class S3Options:
    """What `Checkpointer("s3://...", storage_options={...})` accepts; every field is optional.

    Credentials left out come from botocore's usual chain; given ones are never shown by repr().
    """

    endpoint_url: Optional[str] = None  # an S3-compatible server, e.g. "http://127.0.0.1:8333"
    region_name: Optional[str] = None
    profile_name: Optional[str] = None
    aws_access_key_id: Optional[str] = field(default=None, repr=False)
    aws_secret_access_key: Optional[str] = field(default=None, repr=False)
    aws_session_token: Optional[str] = field(default=None, repr=False)
    addressing_style: Optional[str] = None  # "path" | "virtual" | "auto" (botocore's default)
    max_concurrency: int = 8  # parts in flight at once, over all the files of a transfer
    part_bytes: int = 16 << 20  # multipart part size; smaller files go up in one PUT
    max_attempts: int = 5  # per request, the first one included
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    lease_seconds: float = 30.0  # a dead writer's lease is taken over after this long (writer_lease.py)
    spool_dir: Optional[str] = None  # where parts are written before upload (local_spool.py)

    def __post_init__(self) -> None:
        for name, low in (("max_concurrency", 1), ("max_attempts", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"storage_options[{name!r}] must be an integer >= {low}, got {value!r}")
        if not isinstance(self.part_bytes, int) or not MIN_PART_BYTES <= self.part_bytes <= MAX_PART_BYTES:
            raise ValueError(f"storage_options['part_bytes'] must be an integer in [5 MiB, 5 GiB] (S3's part size "
                             f"limits), got {self.part_bytes!r}")
        for name, bound in (("connect_timeout", 0.0), ("read_timeout", 0.0), ("lease_seconds", 1.0)):
            seconds = getattr(self, name)
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > bound:
                raise ValueError(f"storage_options[{name!r}] must be a number > {bound:g} (seconds), got {seconds!r}")
        if self.addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(f"storage_options['addressing_style'] must be 'path', 'virtual' or 'auto', "
                             f"got {self.addressing_style!r}")
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError("storage_options needs both aws_access_key_id and aws_secret_access_key, or neither "
                             "(then credentials come from the environment or the AWS config)")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> S3Options:
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown storage_options {unknown} for an s3:// checkpoint; known: {sorted(known)}")
        return cls(**options)


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # relative to the prefix
    bytes: int
    modified_unix: float


def parse_url(url: str) -> tuple[str, str]:
    """("bucket", "key/prefix/") of "s3://bucket/key/prefix"; the prefix ends with "/" unless empty."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"{url!r}: {bucket!r} is not a bucket name (3 or more lower-case letters, digits, "
                         "'.', '-'); the URL is s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r}: the prefix {prefix!r} has an empty, '.' or '..' component")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store:
    """The objects under s3://bucket/prefix/. Thread-safe (boto3 clients are); the training
    thread lists and reads, the commit thread uploads and deletes, the lease thread renews."""

    def __init__(self, url: str, options: S3Options) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.options = options
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = _make_client(options)
        self._transfers: Any = None

    def url_of(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    # ------------------------------------------------------------------------- small objects

    def check_bucket(self) -> None:
        with translated("HeadBucket", f"s3://{self.bucket}", self.options):
            self._client.head_bucket(Bucket=self.bucket)

    def list_objects(self, under: str = "") -> list[ObjectInfo]:
        """Every object whose name starts with `under` (relative to the prefix)."""
        out = []
        with translated("ListObjectsV2", self.url_of(under), self.options):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                             Prefix=self.prefix + under):
                for o in page.get("Contents", []):
                    out.append(ObjectInfo(o["Key"][len(self.prefix):], int(o["Size"]), o["LastModified"].timestamp()))
        return out

    def put(self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """Writes one object; returns its ETag, or None when a condition failed (HTTP 412)."""
        extra: dict[str, str] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        with translated("PutObject", self.url_of(name), self.options, precondition_ok=True) as outcome:
            outcome.value = self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data,
                                                    **extra)["ETag"]
        return outcome.value

    def get(self, name: str) -> tuple[bytes, str, float] | None:
        """(data, ETag, age in seconds by the server's clock), or None when there is no such object."""
        with translated("GetObject", self.url_of(name), self.options, missing_ok=True) as outcome:
            r = self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            data = r["Body"].read()
            now = email.utils.parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            age = (now - r["LastModified"]).total_seconds() if now.tzinfo else 0.0
            outcome.value = (data, r["ETag"], age)
        return outcome.value

    def delete(self, names: list[str]) -> None:
        """Deletes objects (absent ones too: S3 deletes are idempotent), 1000 per request."""
        for start in range(0, len(names), 1000):
            batch = names[start:start + 1000]
            with translated("DeleteObjects", self.url_of(batch[0]), self.options):
                r = self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self.prefix + n} for n in batch], "Quiet": True})
            if r.get("Errors"):
                first = r["Errors"][0]
                raise OSError(errno.EIO, f"DeleteObjects could not delete {len(r['Errors'])} object(s), the first "
                                         f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                                         f"{first.get('Message', '')}")

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy (multipart for large objects)."""
        future = self.transfers().copy({"Bucket": self.bucket, "Key": self.prefix + src}, self.bucket,
                                       self.prefix + dst)
        with translated("CopyObject", self.url_of(src), self.options):
            future.result()

    def unfinished_uploads(self, under: str = "") -> list[tuple[str, str]]:
        """(name, upload id) of every multipart upload begun and never completed or aborted."""
        out: list[tuple[str, str]] = []
        with translated("ListMultipartUploads", self.url_of(under), self.options):
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                    Prefix=self.prefix + under):
                out.extend((u["Key"][len(self.prefix):], u["UploadId"]) for u in page.get("Uploads", []))
        return out

    def abort_upload(self, name: str, upload_id: str) -> None:
        with translated("AbortMultipartUpload", self.url_of(name), self.options, missing_ok=True):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.prefix + name, UploadId=upload_id)

    # ------------------------------------------------------------------------- file transfers

    def upload(self, files: list[tuple[Path, str]], progress: Callable[[int], None] | None = None) -> None:
        """Uploads local files to names, all at once, in parts of `part_bytes`; returns when every
        one is complete, or raises the first failure once none is in flight any more (a failed
        multipart upload is aborted by the transfer manager, or by a writer's next clean-up)."""
        self._transfer_all("upload", [(str(path), name) for path, name in files], progress)

    def download(self, files: list[tuple[str, Path]]) -> None:
        """Downloads names to local files, all at once, large objects by parallel ranged GETs."""
        self._transfer_all("download", [(name, str(path)) for name, path in files], None)

    def transfers(self) -> Any:
        if self._transfers is None:
            from boto3.s3.transfer import TransferConfig, create_transfer_manager

            config = TransferConfig(multipart_threshold=self.options.part_bytes,
                                    multipart_chunksize=self.options.part_bytes,
                                    max_concurrency=self.options.max_concurrency,
                                    num_download_attempts=self.options.max_attempts,
                                    preferred_transfer_client="classic")
            self._transfers = create_transfer_manager(self._client, config)
            weakref.finalize(self, self._transfers.shutdown)  # its threads end with this store
        return self._transfers

    def _transfer_all(self, kind: str, pairs: list[tuple[str, str]], progress: Callable[[int], None] | None) -> None:
        manager = self.transfers()
        subscribers = [_Progress(progress)] if progress is not None else None
        futures = []
        try:
            for a, b in pairs:
                if kind == "upload":
                    futures.append((b, manager.upload(a, self.bucket, self.prefix + b, subscribers=subscribers)))
                else:
                    futures.append((a, manager.download(self.bucket, self.prefix + a, b, subscribers=subscribers)))
        finally:
            first: BaseException | None = None
            for name, future in futures:  # every transfer ends before this returns or raises
                try:
                    with translated(kind, self.url_of(name), self.options):
                        future.result()
                except BaseException as e:  # noqa: BLE001 - raised below, once nothing is in flight
                    if first is None:
                        first = e
                        for _, other in futures:
                            other.cancel()
            if first is not None:
                raise first

    def close(self) -> None:
        """Ends the transfer threads (a later transfer starts them again)."""
        if self._transfers is not None:
            self._transfers.shutdown()
            self._transfers = None


class _Outcome:
    value: Any = None


@contextmanager
def translated(operation: str, url: str, options: S3Options, *, missing_ok: bool = False,
               precondition_ok: bool = False) -> Iterator[_Outcome]:
    """Runs an S3 call; raises what it failed with as an OSError that names `url` and says what
    to do. missing_ok: a 404 leaves the outcome None; precondition_ok: so does a 412."""
    import botocore.exceptions as bx
    from s3transfer.exceptions import RetriesExceededError

    outcome = _Outcome()
    try:
        yield outcome
    except RetriesExceededError as e:
        raise _as_os_error(e.last_exception, operation, url, options) from None
    except bx.ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = e.response.get("Error", {}).get("Code", "")
        if (missing_ok and (status == 404 or code in ("NoSuchKey", "NoSuchUpload"))) or (
                precondition_ok and (status == 412 or code == "PreconditionFailed")):
            outcome.value = None
            return
        raise _as_os_error(e, operation, url, options) from None
    except (bx.BotoCoreError, ConnectionError) as e:
        raise _as_os_error(e, operation, url, options) from None


def _as_os_error(e: BaseException, operation: str, url: str, options: S3Options) -> OSError:
    import botocore.exceptions as bx

    where = f"S3 {operation} of {url}"
    if isinstance(e, bx.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = e.response.get("Error", {}).get("Code", "") or str(status)
        message = e.response.get("Error", {}).get("Message", "")
        attempts = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        if status == 403 or code in _DENIED:
            return PermissionError(errno.EACCES, f"{where}: access denied ({code}, HTTP {status}). Check the "
                                                 "credentials found (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                                                 "AWS_PROFILE, ~/.aws, or storage_options) and that they may "
                                                 "use this bucket")
        if code == "NoSuchBucket" or (operation == "HeadBucket" and status == 404):
            return FileNotFoundError(errno.ENOENT, f"{where}: the bucket does not exist; create it, or check the "
                                                   "URL and the endpoint_url")
        if status == 404 or code in ("NoSuchKey", "NoSuchUpload"):
            return FileNotFoundError(errno.ENOENT, f"{where}: no such object ({code}, HTTP 404)")
        if code in _THROTTLED or status == 429:
            return OSError(errno.EBUSY, f"{where}: the server still throttles after {attempts} attempts ({code}, "
                                        f"HTTP {status}); lower storage_options['max_concurrency'] or raise "
                                        "'max_attempts', then try again")
        return OSError(errno.EIO, f"{where} failed after {attempts} attempt(s): {code} (HTTP {status}) {message}")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return PermissionError(errno.EACCES, f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                                             "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass storage_options="
                                             "{'aws_access_key_id': ..., 'aws_secret_access_key': ...}")
    if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, ConnectionError)):
        return ConnectionError(errno.ECONNABORTED, f"{where}: the server could not be reached or dropped the "
                                                   f"connection, {options.max_attempts} attempt(s) with backoff "
                                                   f"({type(e).__name__}: {e}). Check that the endpoint "
                                                   f"({options.endpoint_url or 'AWS'}) is up, then try again")
    return OSError(errno.EIO, f"{where} failed: {type(e).__name__}: {e}")


class _Progress:
    """An s3transfer subscriber that reports the bytes each part adds."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self._report = report

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        pass

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._report(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        pass


def _make_client(options: S3Options) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ImportError('checkpoints in s3:// need boto3: pip install "pyengine[s3]"') from None
    config = Config(retries={"mode": "standard", "total_max_attempts": options.max_attempts},
                    connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
                    max_pool_connections=options.max_concurrency + 4,
                    s3={"addressing_style": options.addressing_style} if options.addressing_style else None)
    # A session loads botocore's service models (~0.1 s); clients of one session share them. It
    # also caches the credentials it resolved, so sessions are keyed by what they are resolved from.
    key = (options.profile_name, *(os.environ.get(v) for v in _CREDENTIAL_VARIABLES))
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = boto3.session.Session(profile_name=options.profile_name)
        return session.client("s3", endpoint_url=options.endpoint_url, region_name=options.region_name,
                              aws_access_key_id=options.aws_access_key_id,
                              aws_secret_access_key=options.aws_secret_access_key,
                              aws_session_token=options.aws_session_token, config=config)


_CREDENTIAL_VARIABLES = ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_sessions: dict[tuple, Any] = {}
_sessions_lock = threading.Lock()
