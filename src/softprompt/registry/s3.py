"""The S3 artifact store: `S3Store`, an `ArtifactStore` over an S3 (or S3-compatible) bucket.

boto3 is imported only when the first request needs a client, so importing this module (and the
registry) does not load it. Uploads record the content's SHA-256 and are conditional where asked
(`IfNoneMatch`, `IfMatch`); downloads are hashed and checked; botocore errors become StoreErrors
that name the bucket, the key and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import mimetypes
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from softprompt.errors import ConflictError, IntegrityError, StoreError
from softprompt.registry.objects import (
    CHUNK,
    INTERNAL_PREFIX,
    MiB,
    NotFoundError,
    ObjectInfo,
    file_mode,
    sha256_file,
    validate_key,
    validate_prefix,
)

AddressingStyle = Literal["auto", "path", "virtual"]
_META_SHA = "sha256"  # stored as x-amz-meta-sha256: the full-object hash, multipart uploads included
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
    "403",
}
_T = TypeVar("_T")


class S3Store:
    """Objects in an S3 (or S3-compatible) bucket under a key prefix.

    Credentials come only from the standard AWS chain (env, profile, SSO, instance role); this
    class never stores, logs or prints them. Every upload records the content's SHA-256 in the
    object metadata (and sends `ChecksumAlgorithm=SHA256` so S3 checks the bytes in transit);
    every download is hashed and compared with that record, because some servers (moto, older
    MinIO) do not verify checksums themselves.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: AddressingStyle = "auto",
        max_attempts: int = 5,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not bucket or "/" in bucket:
            raise StoreError(f"invalid S3 bucket name {bucket!r}; write the store as s3://BUCKET/PREFIX")
        if addressing_style not in ("auto", "path", "virtual"):
            raise StoreError(f"addressing_style={addressing_style!r}; use 'auto', 'path' or 'virtual'")
        if max_attempts < 1:
            raise StoreError(f"max_attempts={max_attempts}; use 1 (no retries) or more")
        if multipart_chunksize < 5 * MiB:
            raise StoreError(f"multipart_chunksize={multipart_chunksize}; S3 parts must be at least 5 MiB")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix, what="S3 prefix")
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        self.addressing_style = addressing_style
        self.max_attempts = max_attempts
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self._bucket_checked = False

    def __repr__(self) -> str:
        return (
            f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r}, "
            f"region={self.region!r}, profile={self.profile!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for Ray workers: the client (and the credentials inside it) is rebuilt there.
        state = self.__dict__.copy()
        state["_client_obj"] = None
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    # -- the Protocol

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """See `ArtifactStore.put_bytes`."""
        if if_none_match and if_match is not None:
            raise StoreError(f"put of {key!r}: pass if_none_match or if_match, not both")
        args = self._put_args(key, hashlib.sha256(data).hexdigest(), if_none_match)
        if if_match is not None:
            args["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        response = self._call("upload", key, lambda: self._client().put_object(Body=data, **args))
        return str(response["ETag"]).strip('"')

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """See `ArtifactStore.put_file`; files above `multipart_threshold` go up in parts."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"cannot upload {path} to {self.uri(key)}: the file does not exist")
        args = self._put_args(key, sha256_file(path), if_none_match)
        if path.stat().st_size <= self.multipart_threshold:
            with path.open("rb") as body:
                response = self._call("upload", key, lambda: self._client().put_object(Body=body, **args))
            return str(response["ETag"]).strip('"')
        return self._multipart(key, path, args)

    def get_bytes(self, key: str) -> bytes:
        """See `ArtifactStore.get_bytes`."""
        buffer = io.BytesIO()

        def download() -> None:
            buffer.seek(0)
            buffer.truncate()
            self._download(key, buffer)

        self._retry_streaming(key, download)
        return buffer.getvalue()

    def get_file(self, key: str, dest: Path) -> Path:
        """See `ArtifactStore.get_file`; `dest` only appears once its bytes are verified."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def download() -> None:
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f"{INTERNAL_PREFIX}tmp-")
            try:
                os.fchmod(fd, file_mode())  # mkstemp makes it 0600
                with os.fdopen(fd, "wb") as out:
                    self._download(key, out)
                os.replace(name, dest)
            finally:
                Path(name).unlink(missing_ok=True)

        self._retry_streaming(key, download)
        return dest

    def head(self, key: str) -> ObjectInfo | None:
        """See `ArtifactStore.head`."""
        try:
            r = self._call(
                "head", key, lambda: self._client().head_object(**self._loc(key), ChecksumMode="ENABLED")
            )
        except NotFoundError:
            self._check_bucket()  # S3 answers a bare 404 for a missing bucket too; tell them apart
            return None
        return ObjectInfo(
            key=key, size=int(r["ContentLength"]), etag=str(r["ETag"]).strip('"'), sha256=_recorded_sha(r)
        )

    def list(self, prefix: str = "") -> list[str]:
        """See `ArtifactStore.list`."""
        validate_prefix(prefix)
        stem = prefix.rstrip("/")
        full = self._full(stem) if stem else self.prefix
        if full and (prefix.endswith("/") or not stem):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0

        def pages() -> list[str]:
            paginator = self._client().get_paginator("list_objects_v2")
            return [
                o["Key"]
                for page in paginator.paginate(Bucket=self.bucket, Prefix=full)
                for o in page.get("Contents", [])
            ]

        return sorted(k[strip:] for k in self._call("list", prefix.rstrip("/"), pages))

    def delete(self, key: str) -> None:
        """See `ArtifactStore.delete`."""
        self._call("delete", key, lambda: self._client().delete_object(**self._loc(key)))

    def uri(self, key: str = "") -> str:
        """See `ArtifactStore.uri`."""
        return f"s3://{self.bucket}/{self._full(key) if key else self.prefix}".rstrip("/")

    # -- helpers

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _loc(self, key: str) -> dict[str, str]:
        return {"Bucket": self.bucket, "Key": self._full(key)}

    def _put_args(self, key: str, sha256: str, if_none_match: bool) -> dict[str, Any]:
        args: dict[str, Any] = {
            **self._loc(key),
            "Metadata": {_META_SHA: sha256},
            "ChecksumAlgorithm": "SHA256",
        }
        content_type = mimetypes.guess_type(key)[0]
        if content_type:
            args["ContentType"] = content_type
        if if_none_match:
            args["IfNoneMatch"] = "*"
        return args

    def _multipart(self, key: str, path: Path, args: dict[str, Any]) -> str:
        client = self._client()
        if_none_match = args.pop("IfNoneMatch", None)
        upload = self._call("upload", key, lambda: client.create_multipart_upload(**args))
        upload_id = upload["UploadId"]
        parts = []
        try:
            with path.open("rb") as f:
                for number, chunk in enumerate(iter(lambda: f.read(self.multipart_chunksize), b""), start=1):
                    part = self._call(
                        "upload",
                        key,
                        functools.partial(
                            client.upload_part,
                            **self._loc(key),
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=chunk,
                            ChecksumAlgorithm="SHA256",
                        ),
                    )
                    parts.append(
                        {
                            "PartNumber": number,
                            "ETag": part["ETag"],
                            "ChecksumSHA256": part.get("ChecksumSHA256"),
                        }
                    )
            extra = {"IfNoneMatch": if_none_match} if if_none_match else {}
            done = self._call(
                "upload",
                key,
                lambda: client.complete_multipart_upload(
                    **self._loc(key), UploadId=upload_id, MultipartUpload={"Parts": parts}, **extra
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):  # best effort; a lifecycle rule cleans up the rest
                client.abort_multipart_upload(**self._loc(key), UploadId=upload_id)
            raise
        return str(done["ETag"]).strip('"')

    def _download(self, key: str, out: IO[bytes]) -> None:
        response = self._call(
            "download", key, lambda: self._client().get_object(**self._loc(key), ChecksumMode="ENABLED")
        )
        digest = hashlib.sha256()
        for chunk in response["Body"].iter_chunks(CHUNK):
            digest.update(chunk)
            out.write(chunk)
        expected = _recorded_sha(response)
        if expected is not None and digest.hexdigest() != expected:
            raise IntegrityError(
                f"{self.uri(key)} is corrupt: its bytes hash to sha256 {digest.hexdigest()} but the object "
                f"records {expected}; the stored copy is damaged — restore it from a good copy"
            )

    def _retry_streaming(self, key: str, fn: Callable[[], None]) -> None:
        """Retry a whole download when the body stream breaks after botocore already returned.

        botocore's own retries cover the request (throttling, 5xx, refused connections); a body
        that dies half-way through is ours to retry.
        """
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        for attempt in range(1, self.max_attempts + 1):
            try:
                fn()
                return
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError) as e:
                if attempt == self.max_attempts:
                    raise StoreError(
                        f"download of {self.uri(key)} broke off {attempt} times ({type(e).__name__}); "
                        "check the network or raise max_attempts"
                    ) from e
                time.sleep(min(5.0, 0.2 * 2**attempt) * random.uniform(0.5, 1.0))

    def _client(self) -> Any:
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    self._client_obj = self._make_client()
        return self._client_obj

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        custom = (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        style = self.addressing_style
        if style == "auto":
            style = "path" if custom else "auto"  # MinIO/moto/Ceph rarely have wildcard DNS
        config = Config(
            s3={"addressing_style": style},
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )
        try:
            session = boto3.session.Session(profile_name=self.profile)
            return session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
        except ProfileNotFound as e:
            raise StoreError(
                f"AWS profile {self.profile!r} (for bucket {self.bucket!r}) is not in ~/.aws/config; "
                "fix --profile or unset it to use the default credential chain"
            ) from e
        except (BotoCoreError, ValueError) as e:
            raise StoreError(
                f"cannot create an S3 client for bucket {self.bucket!r}: {_scrub(str(e))}"
            ) from e

    def _endpoint(self) -> str:
        if self.endpoint_url:
            return self.endpoint_url
        client = self._client_obj
        return str(client.meta.endpoint_url) if client is not None else "the default AWS endpoint"

    def _check_bucket(self) -> None:
        if self._bucket_checked:
            return
        self._call("check bucket", "", lambda: self._client().head_bucket(Bucket=self.bucket))
        self._bucket_checked = True

    def _call(self, op: str, key: str, fn: Callable[[], _T]) -> _T:
        """Run one boto3 call, turning botocore errors into StoreErrors that name bucket, key and fix."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = self.uri(key) if key else f"bucket {self.bucket!r}"
        try:
            return fn()
        except ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (op == "check bucket" and status == 404):
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist at endpoint {self._endpoint()}; "
                    "create it or fix publish.store"
                ) from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise ConflictError(
                    f"{op} of {where} refused: another writer changed it first ({code})"
                ) from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                if op == "upload":  # If-Match on a key that is gone: the condition failed
                    raise ConflictError(
                        f"{op} of {where} refused: the object it should replace is gone"
                    ) from None
                raise NotFoundError(f"key {key!r} not found in s3://{self.bucket}/{self.prefix}") from None
            if code in _CREDENTIAL_CODES or status == 403:
                raise StoreError(
                    f"access to bucket {self.bucket!r} at {self._endpoint()} was refused ({code or status}) "
                    f"during {op} of {where}; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS "
                    "profile, and that they may read and write this bucket"
                ) from None
            raise StoreError(
                f"S3 {op} of {where} failed: {code} {_scrub(str(error.get('Message', '')))}".rstrip()
            ) from None
        except NoCredentialsError:
            raise StoreError(
                f"no AWS credentials found for bucket {self.bucket!r}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or pass --profile"
            ) from None
        except (EndpointConnectionError, BotoConnectionError) as e:
            raise StoreError(
                f"cannot reach the S3 endpoint {self._endpoint()} for bucket {self.bucket!r} during {op} of "
                f"{where} after {self.max_attempts} attempt(s) ({type(e).__name__}); check --endpoint-url "
                "and the network"
            ) from None


def _recorded_sha(response: dict[str, Any]) -> str | None:
    """The SHA-256 an object records: our metadata, else a full-object S3 checksum."""
    sha = response.get("Metadata", {}).get(_META_SHA)
    if sha:
        return str(sha).lower()
    checksum = response.get("ChecksumSHA256")
    if checksum and "-" not in checksum:  # "...-N" is a checksum of part checksums, not of the bytes
        import base64

        return base64.b64decode(checksum).hex()
    return None


def _scrub(text: str) -> str:
    """Remove credential values taken from the environment from a message we did not write."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
