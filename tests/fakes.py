"""Loopback fakes of the services weights come from: Replicate, the Hugging Face Hub, CivitAI, plain HTTP.

One threaded `http.server` answers all of them, so a test starts one `FakeServer` and points
`FLUX_LORA_REPLICATE_URL`, `HF_ENDPOINT` and `FLUX_LORA_CIVITAI_URL` at `server.url`. They speak just
enough of each protocol for the real clients (requests, huggingface_hub 2.4) to run unchanged:

- static files with ranged GETs (`Accept-Ranges`/206), switchable per server (`ranges=False`);
- Replicate: `/{owner}/{model}[/versions/{v}]/_weights` redirects to a tar under `/delivery/`;
- Hub: any repo from `{repo_id: {path: bytes}}`: model info with siblings, tree listing (recursive or
  not), `resolve` with `X-Repo-Commit`, `ETag`, `Content-Length` (HEAD and GET), optional redirect of
  LFS files to another origin with `X-Linked-Size`/`X-Linked-Etag`, gated and private repos, and the
  `X-Error-Code` headers huggingface_hub maps to typed errors;
- CivitAI: `/api/v1/models/<id>` and `/api/download/models/<versionId>` (a 307 to the file);
- faults per path: an HTTP status n times then success, a truncated body, an HTML page, a slow answer.

Every request is recorded in `server.requests` so tests can count downloads and inspect headers.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclass
class Fault:
    """A misbehaviour of one path: `kind` is "status", "truncate", "html" or "slow"."""

    kind: str
    times: int = 1  # how many requests misbehave before the path works (-1: always)
    status: int = 503
    delay: float = 0.0


@dataclass
class HubRepo:
    """A Hub repository: files by path, and who may read it."""

    files: dict[str, bytes]
    gated: bool = False  # readable only with the server's hub_token (GatedRepo error otherwise)
    private: bool = False  # like gated, but answers RepoNotFound, as the Hub does
    sha: str = ""

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + self.files[path])
            self.sha = digest.hexdigest()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeState:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    hub: dict[str, HubRepo] = field(default_factory=dict)
    civitai: dict[int, list[dict]] = field(default_factory=dict)
    civitai_files: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    replicate_token: str | None = None
    hub_token: str | None = None
    civitai_token: str | None = None
    hub_cdn: str | None = None  # base URL LFS files redirect to (another origin); None: serve directly
    ranges: bool = True
    chunk_delay: float = 0.0  # seconds to sleep between 64 KiB chunks (a slow server)
    sent: int = 0  # body bytes written to clients so far (a download that stopped stops this count)
    requests: list[Recorded] = field(default_factory=list)


def tar_of(members: dict[str, bytes], gz: bool = False) -> bytes:
    """A tar (or tar.gz) archive holding `members` as regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a cancelled download, a soak client giving up) is no error to print."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FakeServer:
    """A threaded HTTP server on 127.0.0.1 (a context manager); `url` is its base URL."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.state = FakeState()
        state = self.state

        class Handler(_Handler):
            fake = state

        self._httpd = _QuietServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        # Another spelling of the same origin, for tests of cross-host redirects.
        self.alt_url = f"http://localhost:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def requests(self) -> list[Recorded]:
        return self.state.requests

    def count(self, method: str, path_prefix: str) -> int:
        """How many requests with `method` went to a path starting with `path_prefix`."""
        return sum(1 for r in self.state.requests if r.method == method and r.path.startswith(path_prefix))

    # --- generic files -------------------------------------------------------------------------------

    def add_file(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
        return self.url + path

    def add_redirect(self, path: str, location: str) -> str:
        self.state.redirects[path] = location
        return self.url + path

    def fault(self, path: str, kind: str, times: int = 1, status: int = 503, delay: float = 0.0) -> None:
        self.state.faults[path] = Fault(kind, times, status, delay)

    # --- Replicate -----------------------------------------------------------------------------------

    def add_replicate_model(self, owner: str, model: str, tar_bytes: bytes,
                            version: str | None = None) -> str:
        """Serve `tar_bytes` as the weights of owner/model (or of one version); returns the tar's URL."""
        name = f"{owner}-{model}-{version or 'latest'}"
        delivery = self.add_file(f"/delivery/{name}/trained_model.tar", tar_bytes)
        route = f"/{owner}/{model}" + (f"/versions/{version}" if version else "") + "/_weights"
        self.add_redirect(route, delivery)
        return delivery

    # --- Hugging Face Hub ----------------------------------------------------------------------------

    def add_hub_repo(self, repo_id: str, files: dict[str, bytes], gated: bool = False,
                     private: bool = False) -> HubRepo:
        repo = HubRepo(files=dict(files), gated=gated, private=private)
        self.state.hub[repo_id] = repo
        return repo

    # --- CivitAI -------------------------------------------------------------------------------------

    def add_civitai_model(self, model_id: int, versions: list[tuple[int, str, bytes]]) -> None:
        """A model with versions (newest first), each (version_id, file name, bytes) of one SafeTensor."""
        entries = []
        for version_id, name, data in versions:
            self.state.civitai_files[version_id] = (name, data)
            entries.append({
                "id": version_id,
                "name": f"v{version_id}",
                "files": [
                    {"id": version_id * 10 + 1, "name": name.replace(".safetensors", ".pt"), "type": "Model",
                     "primary": False, "metadata": {"format": "PickleTensor"},
                     "downloadUrl": f"{self.url}/api/download/models/{version_id}?format=PickleTensor"},
                    {"id": version_id * 10, "name": name, "type": "Model", "primary": True,
                     "sizeKB": len(data) / 1024, "metadata": {"format": "SafeTensor", "fp": "fp16"},
                     "downloadUrl": f"{self.url}/api/download/models/{version_id}"},
                ],
            })
        self.state.civitai[model_id] = entries


def _hub_folder(path: str) -> dict:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeState
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test output
        pass

    # --- plumbing ------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head: bool = False, content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", content_type)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj: object, head: bool, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), headers, head, "application/json")

    def _error(self, status: int, code: str | None = None, message: str = "", head: bool = False,
               extra: dict[str, str] | None = None) -> None:
        headers = dict(extra or {})
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message or code or "error"}).encode(), headers, head,
                   "application/json")

    def _redirect(self, location: str, status: int = 302, extra: dict[str, str] | None = None,
                  head: bool = False) -> None:
        self._send(status, b"", {"Location": location, **(extra or {})}, head)

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _dispatch(self, head: bool) -> None:
        fake = self.fake
        fake.requests.append(Recorded(self.command, self.path, dict(self.headers.items())))
        path = urlsplit(self.path).path
        fault = fake.faults.get(path)
        if fault and fault.times != 0:
            if fault.times > 0:
                fault.times -= 1
            if self._apply_fault(fault, path, head):
                return
        self._route(path, head)

    def _apply_fault(self, fault: Fault, path: str, head: bool) -> bool:
        """Misbehave; True when the response is complete."""
        if fault.kind == "slow":
            time.sleep(fault.delay)
            return False
        if fault.kind == "status":
            self._error(fault.status, message="injected failure", head=head)
            return True
        if fault.kind == "html":
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self._send(200, page, head=head, content_type="text/html")
            return True
        if fault.kind == "truncate":
            data = self.fake.files.get(path, b"x" * 1000)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return True
        raise ValueError(f"unknown fault {fault.kind}")

    def _serve_bytes(self, data: bytes, head: bool, headers: dict[str, str] | None = None) -> None:
        """Serve `data`, honouring a single `Range: bytes=a-b` when ranges are on."""
        headers = dict(headers or {})
        status, start, end = 200, 0, len(data)
        rng = self.headers.get("Range")
        if self.fake.ranges:
            headers["Accept-Ranges"] = "bytes"
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
                else:
                    start = max(len(data) - int(match.group(2)), 0)
                if start >= len(data):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self.send_response(status)
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Content-Length"] = str(end - start)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        view = memoryview(data)[start:end]
        step = 1 << 16
        for offset in range(0, len(view), step):
            if self.fake.chunk_delay:
                time.sleep(self.fake.chunk_delay)
            self.wfile.write(view[offset : offset + step])
            self.fake.sent += len(view[offset : offset + step])

    # --- routes --------------------------------------------------------------------------------------

    def _route(self, path: str, head: bool) -> None:
        fake = self.fake
        if path in fake.redirects:
            if path.endswith("/_weights") and fake.replicate_token and self._bearer() != fake.replicate_token:
                self._error(401, message="Unauthenticated", head=head)
                return
            self._redirect(fake.redirects[path], head=head)
            return
        if path in fake.files:
            self._serve_bytes(fake.files[path], head)
            return
        if path.startswith("/api/models/"):
            self._hub_api(path[len("/api/models/"):], head)
            return
        if path.startswith("/hub-cdn/"):
            repo_id, _, rel = unquote(path[len("/hub-cdn/"):]).partition("@")
            repo = fake.hub.get(repo_id)
            if repo is None or rel not in repo.files:
                self._error(404, head=head)
                return
            self._serve_bytes(repo.files[rel], head)
            return
        if "/resolve/" in path:
            self._hub_resolve(path, head)
            return
        if path.startswith("/api/v1/models/"):
            self._civitai_model(path.rsplit("/", 1)[-1], head)
            return
        if path.startswith("/api/download/models/"):
            self._civitai_download(path.rsplit("/", 1)[-1], head)
            return
        if path.startswith("/civitai-cdn/"):
            version = int(path.split("/")[2])
            self._serve_bytes(fake.civitai_files[version][1], head)
            return
        self._error(404, message="Not found", head=head)

    # Hub -----------------------------------------------------------------------------------------------

    def _hub_access(self, repo_id: str, head: bool) -> HubRepo | None:
        """The repo when this request may read it; otherwise the error was sent and None returned."""
        repo = self.fake.hub.get(repo_id)
        authorized = self.fake.hub_token is not None and self._bearer() == self.fake.hub_token
        if repo is None or (repo.private and not authorized):
            self._error(401, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated and not authorized:
            self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it.", head)
            return None
        return repo

    def _hub_api(self, rest: str, head: bool) -> None:
        # {owner}/{name}[/revision/{rev}] or {owner}/{name}/tree/{rev}[/{path}]
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        repo = self._hub_access(repo_id, head)
        if repo is None:
            return
        tail = parts[2:]
        if not tail or tail[0] == "revision":
            siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())]
            self._json({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                        "gated": "auto" if repo.gated else False, "siblings": siblings, "tags": []}, head)
            return
        if tail[0] == "tree":
            prefix = unquote("/".join(tail[2:])).strip("/")
            query = parse_qs(urlsplit(self.path).query)
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            self._json(self._hub_tree(repo, prefix, recursive), head)
            return
        self._error(404, message="Not found", head=head)

    @staticmethod
    def _hub_tree(repo: HubRepo, prefix: str, recursive: bool) -> list[dict]:
        entries: dict[str, dict] = {}
        base = f"{prefix}/" if prefix else ""
        for path, data in sorted(repo.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folder = base + rest.split("/", 1)[0]
                entries[folder] = _hub_folder(folder)
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    folder = base + "/".join(parts[:i])
                    entries[folder] = _hub_folder(folder)
            entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if path.endswith(".safetensors"):
                sha256 = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
            entries[path] = entry
        return list(entries.values())

    def _hub_resolve(self, path: str, head: bool) -> None:
        owner_name, _, rest = path.lstrip("/").partition("/resolve/")
        repo_id = unquote(owner_name)
        revision, _, rel = rest.partition("/")
        revision, rel = unquote(revision), unquote(rel)
        repo = self._hub_access(repo_id, head)
        if repo is None:
            return
        if revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id", head)
            return
        commit = {"X-Repo-Commit": repo.sha}
        if rel not in repo.files:
            self._error(404, "EntryNotFound", "Entry not found", head, commit)
            return
        data = repo.files[rel]
        lfs = rel.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        if lfs and self.fake.hub_cdn:
            location = f"{self.fake.hub_cdn}/hub-cdn/{quote(repo_id + '@' + rel, safe='')}"
            self._redirect(location, 302, {**commit, "X-Linked-Size": str(len(data)),
                                          "X-Linked-Etag": f'"{etag}"', "ETag": '"pointer"'}, head)
            return
        self._serve_bytes(data, head, {**commit, "ETag": f'"{etag}"'})

    # CivitAI ---------------------------------------------------------------------------------------------

    def _civitai_authorized(self) -> bool:
        return self.fake.civitai_token is None or self._bearer() == self.fake.civitai_token

    def _civitai_model(self, model_id: str, head: bool) -> None:
        versions = self.fake.civitai.get(int(model_id)) if model_id.isdigit() else None
        if versions is None:
            self._error(404, message="No model with id " + model_id, head=head)
            return
        self._json({"id": int(model_id), "name": f"model {model_id}", "type": "LORA",
                    "modelVersions": versions}, head)

    def _civitai_download(self, version_id: str, head: bool) -> None:
        if not version_id.isdigit() or int(version_id) not in self.fake.civitai_files:
            self._error(404, message="Model not found", head=head)
            return
        if not self._civitai_authorized():
            self._error(401, message="The creator of this asset requires you to be logged in", head=head)
            return
        name = self.fake.civitai_files[int(version_id)][0]
        self._redirect(f"{self.url_base()}/civitai-cdn/{version_id}/{quote(name)}", 307, head=head)

    def url_base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"
