"""DEST's lock on S3: conditional writes through boto3 (see ``jobs.lock_backends`` for the steps).

``PUT If-None-Match: *`` creates, ``PUT If-Match: <etag>`` takes over or refreshes, ``DELETE
If-Match`` releases; S3 answers the loser of a race 412 Precondition Failed, and a request on a
deleted lock 404, which ``refresh``/``check``/``release`` read as "no longer ours" instead of
raising. pyarrow's S3 client cannot send these headers, hence boto3 (``pip install
'quantize-all[s3]'``). Must not import ray or click.
"""

from __future__ import annotations

from jobs.lock_backends import parse_holder
from jobs.lock_identity import process_alive
from jobs.store import (LOCK_NAME, Store, StoreError, TransientStoreError, boto3_client,
                        redact_text)


class S3Backend:
    """Conditional writes through boto3 (pyarrow's S3 client cannot send If-None-Match)."""

    mode = "s3-conditional"

    def __init__(self, store: Store):
        self.store = store
        self.bucket, _, self.key = store.path(LOCK_NAME).partition("/")
        self.client = boto3_client(store, read_timeout_s=20)
        self.etag: str | None = None

    def create(self, blob: bytes) -> bool:
        return self._put(blob, IfNoneMatch="*")

    def read(self) -> tuple[dict | None, str | None]:
        try:
            got = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key)
        except NotFound:
            return None, None
        return parse_holder(got["Body"].read()), got["ETag"]

    def alive(self, holder: dict) -> bool | None:
        return process_alive(holder)

    def take_over(self, token: str | None, blob: bytes) -> bool:
        return token is not None and self._put(blob, IfMatch=token)

    def refresh(self, blob: bytes) -> bool:
        if self.etag is None:
            return False
        try:
            if self._put(blob, IfMatch=self.etag):
                return True
        except NotFound:
            pass                              # deleted behind our back
        self.etag = None
        return False

    def check(self) -> bool:
        try:
            got = self._call(self.client.head_object, Bucket=self.bucket, Key=self.key)
        except NotFound:
            return False
        return self.etag is not None and got["ETag"] == self.etag

    def release(self) -> None:
        etag, self.etag = self.etag, None
        if etag is None:
            return
        try:
            self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except (Precondition, NotFound):
            pass                              # someone else's lock now, or already gone
        except StoreError as e:
            if "NotImplemented" not in str(e):
                raise
            _, current = self.read()          # a store without conditional deletes
            if current == etag:
                self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key)

    def close(self) -> None:
        self.etag = None

    def _put(self, blob: bytes, **condition) -> bool:
        try:
            got = self._call(self.client.put_object, Bucket=self.bucket, Key=self.key,
                             Body=blob, ContentType="application/json", **condition)
        except Precondition:
            return False
        self.etag = got["ETag"]
        return True

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise Precondition() from None
            if code in ("NoSuchKey", "404") or status == 404 and code != "NoSuchBucket":
                raise NotFound() from None
            kind = TransientStoreError if status and status >= 500 else StoreError
            raise kind(f"output store {self.store.display}: lock {LOCK_NAME}: "
                       f"{redact_text(str(e))}") from None
        except BotoCoreError as e:
            raise TransientStoreError(f"output store {self.store.display}: lock {LOCK_NAME}: "
                                      f"{redact_text(str(e))}") from None


class Precondition(Exception):
    """S3 refused a conditional write: the lock is not what the condition named."""


class NotFound(Exception):
    """S3 has no ``.lock`` object (never created, released, or deleted by someone)."""


