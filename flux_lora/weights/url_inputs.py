"""The one place where cog's own fetch of URL inputs (`image`, `mask`) is guarded.

How the pinned cog (0.23.1) fetches them, before run() is called: coglet's `prepare_input`
(crates/coglet-python/src/input.rs) calls `cog.types.Path.validate(value)`, looked up anew for each
prediction, on every `cog.Path`-typed input whose value starts with http://, https:// or data:; that
answers a `cog.types.URLPath`, and coglet then calls `.convert()` on each `URLPath` in a thread pool:
a plain `requests.get` (redirects followed, any address) into a temporary file, which coglet deletes
(`unlink`) after the prediction. A failure there reaches the user as "Input validation error: {exc}".

Importing this module replaces `cog.types.Path.validate` for http(s) URLs (data: URIs stay with cog:
no network; a malformed one is refused first, its reason in words rather than cog's decoder's text).
An http(s) value becomes a `GuardedURLPath`, whose `convert()` downloads through
`flux_lora.weights.http.Downloader`: the LoRA rules (public addresses only unless FLUX_LORA_ALLOW_PRIVATE_URLS,
checked before any connection and after each redirect; the connection dials the checked address; the
size cap; retries). A refused or failed fetch does not raise inside coglet, where no field is known:
it yields a `Refused` path, which `check_fetched(run, inputs)`, called first in predict.py's run,
raises as an error naming the field. A value that is not a URL reaches run() untouched, as a string
(coglet converts URLs only): `check_fetched` refuses it too, so no request makes the server open one
of its own files. tests/test_url_inputs.py fails if the pinned cog fetches otherwise.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import typing
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import cog.types

from flux_lora.errors import UserError, for_cog
from flux_lora.weights.http import Downloader, DownloadPolicy, Target
from flux_lora.weights.refs import data_uri_bytes, redact_url
from flux_lora.request import InputError
from flux_lora.settings import Settings

_COG_VALIDATE = cog.types.Path.validate.__func__  # the SDK's own, for everything but http(s) URLs


class Refused(pathlib.PosixPath):
    """Stands for a URL input that was not fetched; `reason` says why (no field: the caller adds it)."""

    reason: str

    def unlink(self, missing_ok: bool = False) -> None:
        """coglet deletes every fetched input after the prediction: there is nothing to delete."""


def _refused(reason: str) -> Refused:
    path = Refused("url-input-not-fetched")
    path.reason = reason
    return path


class GuardedURLPath(cog.types.URLPath):
    """A URL input that coglet fetches through `convert()`: the project's guarded download."""

    def convert(self) -> pathlib.Path:
        if self._path is None:
            self._path = fetch(self.source, self.filename)
        return self._path

    def unlink(self, missing_ok: bool = False) -> None:
        if self._path is not None and not isinstance(self._path, Refused):
            self._path.unlink(missing_ok=missing_ok)


def fetch(url: str, filename: str = "") -> pathlib.Path:
    """Download `url` to a temporary file under the download rules, or a `Refused` saying why not."""
    fd, name = tempfile.mkstemp(suffix=filename[-64:])
    os.close(fd)
    dest = cog.types.Path(name)
    try:
        Downloader(DownloadPolicy.from_settings(Settings.from_env())).download(Target(url, redact_url(url)), dest)
    except UserError as exc:
        dest.unlink(missing_ok=True)
        return _refused(str(exc))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _validate(cls: type, value: Any) -> pathlib.Path:
    scheme = urlsplit(value).scheme.lower() if isinstance(value, str) else ""
    if scheme in ("http", "https"):
        return GuardedURLPath(source=value, filename=cog.types.get_filename(value), fileobj=None)  # type: ignore[arg-type]
    if scheme == "data":  # cog decodes it; a malformed one is refused here, in words, before cog's own text
        try:
            data_uri_bytes(value)
        except ValueError as exc:
            return _refused(str(exc))
    return _COG_VALIDATE(cls, value)


def _path_fields(run: Callable[..., Any]) -> list[str]:
    """The inputs of `run` typed `cog.Path` (or Optional/list of it): coglet's own rule."""
    hints = typing.get_type_hints(run)
    return [name for name, hint in hints.items()
            if name != "return" and cog.types.Path in (hint, *typing.get_args(hint))]


def check_fetched(run: Callable[..., Any], inputs: dict[str, Any]) -> None:
    """Raise, named for its field, the first path input that was refused, failed, or is not a URL."""
    for field in _path_fields(run):
        value = inputs.get(field)
        if isinstance(value, Refused):
            raise for_cog(InputError(field, value.reason))
        if isinstance(value, str):
            raise for_cog(InputError(field, "must be a URL (http, https or data:); files on the server are not read"))


cog.types.Path.validate = classmethod(_validate)  # type: ignore[method-assign,assignment]
