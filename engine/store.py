"""An object store folder (s3://bucket/prefix, or any scheme streaming writes) through
mosaicml-streaming's own storage clients: the run directory of `--out URL` and the converter's
remote sources and outputs.

`ObjectStore(url, local_root)` pairs the store folder with a local folder: `put("a/b")`
uploads local_root/a/b to url/a/b, `get("a/b")` downloads the other way (through a temporary
name, so a reader never sees half a file). Objects are whole or absent (a PUT is atomic), which
is what a run's manifests rely on.

Every client failure reaches the caller as `StoreError`, a UserError whose message names the
store, the operation and what to change (endpoint, credentials, bucket, permission).
"""
import os
import re
import urllib.parse
from pathlib import Path

from streaming.base.storage import CloudDownloader, CloudUploader

from engine.errors import UserError

# Large checkpoint files: streaming's default of 60 s is per download, not per byte.
DOWNLOAD_TIMEOUT_S = 3600.0


class StoreError(UserError):
    pass


def is_url(location: str | os.PathLike) -> bool:
    """A store folder rather than a local path: it has a scheme (s3://, gs://, ...)."""
    return "://" in str(location)


def local_name(url: str) -> str:
    """A folder name for a store folder: s3://bucket/team/run 1 -> bucket-team-run-1."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", url.split("://", 1)[-1]).strip("-")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def explain(error: BaseException, url: str, doing: str) -> str:
    """One line that says what failed and what to change, from any cloud client's exception."""
    names = {type(e).__name__ for e in _chain(error)}
    text = " ".join(str(e) for e in _chain(error))
    codes = {str((getattr(e, "response", None) or {}).get("Error", {}).get("Code")) for e in _chain(error)}
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        fix = ("no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
               "in the environment of every rank")
    elif {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"} & names \
            or "Could not connect" in text:
        fix = (f"the store did not answer (endpoint {os.environ.get('S3_ENDPOINT_URL') or 'the default'}): "
               "check S3_ENDPOINT_URL and the network from this machine")
    elif {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"} & codes:
        fix = "the store refused the credentials: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_PROFILE"
    elif "NoSuchBucket" in codes or "NoSuchBucket" in text or ("404" in codes and doing == "open the store"):
        fix = f"the bucket '{urllib.parse.urlparse(url).netloc}' does not exist: create it or fix the URL"
    elif "403" in codes and doing == "open the store":  # a HEAD request: no error code comes back
        fix = ("the store refused these credentials (403 on the bucket): check AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY, and that they may list the bucket")
    elif {"AccessDenied", "Forbidden", "403"} & codes:
        fix = "permission denied: give these credentials read and write access to the prefix, or choose another URL"
    else:
        fix = "check the URL, S3_ENDPOINT_URL, the credentials and the network"
    return f"{url}: could not {doing} ({type(error).__name__}: {str(error)[:300]}). {fix}."


def _missing(error: BaseException) -> bool:
    """A missing object, however the client says it (streaming's S3 client: a ClientError 404)."""
    for e in _chain(error):
        if isinstance(e, FileNotFoundError):
            return True
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey"):
            return True
    return False


def _chain(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


class ObjectStore:
    """One store folder and the local folder its objects are staged in."""

    def __init__(self, url: str, local_root: Path):
        self.url = url.rstrip("/")
        self.local_root = Path(local_root)
        self.local_root.mkdir(parents=True, exist_ok=True)
        try:
            # keep_local: the staged files are the run's (streaming's default deletes them).
            self._uploader = CloudUploader.get(out=(str(self.local_root), self.url), keep_local=True,
                                               exist_ok=True, retry=3)
        except Exception as error:  # each client raises its own types
            raise StoreError(explain(error, self.url, "open the store")) from error
        self._uploader.progress_bar = False
        self._scratch: ObjectStore | None = None

    def put(self, relative: str) -> None:
        try:
            self._uploader.upload_file(relative)
        except Exception as error:
            raise StoreError(explain(error, join(self.url, relative), "upload")) from error

    def put_text(self, relative: str, text: str) -> None:
        """An object holding `text` at url/relative, whatever the local folder holds there."""
        if self._scratch is None:  # streaming's uploader sends files of its own local folder only
            self._scratch = ObjectStore(self.url, self.local_root / ".put-text")
        path = self._scratch.local_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        try:
            self._scratch.put(relative)
        finally:
            path.unlink(missing_ok=True)

    def get(self, relative: str, destination: Path | None = None) -> Path:
        """Download url/relative to `destination` (default local_root/relative). A missing object
        raises FileNotFoundError; any other failure StoreError."""
        destination = Path(destination or self.local_root / relative)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f"{destination.name}.download{os.getpid()}")
        partial.unlink(missing_ok=True)
        try:
            CloudDownloader.direct_download(join(self.url, relative), str(partial), timeout=DOWNLOAD_TIMEOUT_S)
        except Exception as error:
            partial.unlink(missing_ok=True)
            if _missing(error):
                raise FileNotFoundError(f"{join(self.url, relative)} does not exist") from error
            raise StoreError(explain(error, join(self.url, relative), "download")) from error
        os.replace(partial, destination)
        return destination

    def keys(self, prefix: str = "") -> list[str]:
        """Object names under url/prefix, relative to url, sorted."""
        try:
            listed = self._uploader.list_objects(prefix) or []
        except Exception as error:
            raise StoreError(explain(error, join(self.url, prefix), "list")) from error
        base = urllib.parse.urlparse(self.url).path.strip("/")
        cut = len(base) + 1 if base else 0
        return sorted(key[cut:] if key.startswith(base) else key for key in listed)

    @property
    def s3_client(self):
        """The boto3 client streaming's S3 uploader made for this store (None on other schemes): for
        what streaming's classes do not offer (delete, sizes, a download in one request)."""
        return getattr(self._uploader, "s3", None)

    @property
    def can_delete(self) -> bool:
        """Whether old objects can be removed (S3's client: yes; streaming has no delete)."""
        return self.s3_client is not None

    def delete(self, relatives: list[str]) -> None:
        """Remove objects (S3 only: see can_delete). Missing ones are no error."""
        if not relatives or not self.can_delete:
            return
        parsed = urllib.parse.urlparse(self.url)
        base = parsed.path.strip("/")
        try:
            for start in range(0, len(relatives), 1000):  # the API's limit per request
                chunk = relatives[start:start + 1000]
                self.s3_client.delete_objects(Bucket=parsed.netloc, Delete={
                    "Objects": [{"Key": f"{base}/{r}" if base else r} for r in chunk], "Quiet": True})
        except Exception as error:
            raise StoreError(explain(error, self.url, "delete old objects")) from error

    def check_writable(self) -> None:
        """Write, read back and remove a small object: the credentials may write here."""
        probe = ".clipzero-write-check"
        path = self.local_root / probe
        path.write_text("clipzero checks that it may write here\n")
        try:
            self.put(probe)
            self.delete([probe])
        finally:
            path.unlink(missing_ok=True)
