"""A loopback Hugging Face Hub: the part of the Hub's HTTP API that utils.py
and huggingface_hub's downloader use, serving repos the tests write.

- GET /api/models/{org}/{name}[/revision/{rev}]: the model's info
  (`?blobs=true` adds each file's size, git oid and LFS sha256);
- GET /api/models/{org}/{name}/tree/{rev}: the files, as the tree API lists them;
- HEAD and GET /{org}/{name}/resolve/{rev}/{path}: a file, with Range
  requests, ETag, X-Repo-Commit and, for LFS files, X-Linked-Etag/-Size.

Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo), which is what huggingface_hub reads. A repo is a
folder `ROOT/org/name/` of files; `.tokens` in it (one per line) makes it
gated, open to those tokens. The commit is a hash of the files.

It runs in a process of its own (`HubProcess`): hf_transfer holds the GIL
for a whole download, so a server thread beside it would never answer.
Under `/_test/` it records requests, can break a file's connection part-way,
like a network that drops, and can cap each connection's rate, as CDNs do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from aiohttp import web

_digests: dict[tuple[str, int, int], tuple[str, str]] = {}


def _digests_of(path: Path) -> tuple[str, str]:
    """(git blob oid, sha256) of a file, computed once per version of it."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        oid = hashlib.sha1(b"blob %d\0" % stat.st_size)
        sha256 = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(8 << 20):
                oid.update(block)
                sha256.update(block)
        _digests[key] = (oid.hexdigest(), sha256.hexdigest())
    return _digests[key]


class Repo:
    def __init__(self, folder: Path):
        self.folder = folder
        self.files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        tokens = self.files.pop(".tokens", None)
        self.tokens = set(tokens.read_text().split()) if tokens is not None else None
        digest = hashlib.sha1()
        for name, path in self.files.items():
            digest.update(name.encode() + _digests_of(path)[1].encode())
        self.commit = digest.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith((".safetensors", ".bin"))

    def entry(self, path: str) -> dict:
        oid, sha256 = _digests_of(self.files[path])
        size = self.files[path].stat().st_size
        item = {"size": size, "oid": oid}
        if self.is_lfs(path):
            item["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
        return item


class LocalHub:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[list[str]] = []
        self.breaks: dict[str, list[int]] = {}  # path: [bytes before the break, times left]
        self.per_connection_bytes_per_s = 0  # 0: no cap
        self.app = web.Application()
        add = self.app.router.add_route
        add("GET", "/_test/requests", self.recorded)
        add("DELETE", "/_test/requests", self.forget)
        add("POST", "/_test/break", self.arm_break)
        add("POST", "/_test/throttle", self.throttle)
        add("GET", "/api/models/{org}/{name}", self.info)
        add("GET", "/api/models/{org}/{name}/revision/{rev}", self.info)
        add("GET", "/api/models/{org}/{name}/tree/{rev}", self.tree)
        add("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)

    async def recorded(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def forget(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({})

    async def arm_break(self, request: web.Request) -> web.Response:
        spec = await request.json()
        self.breaks[spec["path"]] = [spec["after_bytes"], spec["times"]]
        return web.json_response({})

    async def throttle(self, request: web.Request) -> web.Response:
        self.per_connection_bytes_per_s = (await request.json())["bytes_per_s"]
        return web.json_response({})

    def _repo(self, request: web.Request) -> Repo:
        self.requests.append([request.method, request.path])
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        folder = self.root / repo_id
        if not folder.is_dir():
            raise _error(404, "RepoNotFound", f"Repository {repo_id} not found")
        repo = Repo(folder)
        if repo.tokens is not None:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not token:
                raise _error(401, "GatedRepo", f"Access to {repo_id} is restricted")
            if token not in repo.tokens:
                raise _error(403, "GatedRepo", f"Access to {repo_id} is restricted")
        revision = request.match_info.get("rev", "main")
        if revision not in ("main", repo.commit):
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    async def info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        siblings = []
        for path in repo.files:
            sibling: dict = {"rfilename": path}
            if request.query.get("blobs", "").lower() == "true":
                entry = repo.entry(path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if lfs := entry.get("lfs"):
                    sibling["lfs"] = {
                        "sha256": lfs["oid"],
                        "size": lfs["size"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        return web.json_response(
            {
                "_id": repo.commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.tokens is not None else False,
                "disabled": False,
                "siblings": siblings,
            }
        )

    async def tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response(
            [{"type": "file", "path": path, **repo.entry(path)} for path in repo.files]
        )

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = request.match_info["path"]
        if path not in repo.files:
            raise _error(404, "EntryNotFound", f"{path} does not exist")
        file, entry = repo.files[path], repo.entry(path)
        headers = {"X-Repo-Commit": repo.commit, "Content-Type": "application/octet-stream"}
        broken = self.breaks.get(path)
        if lfs := entry.get("lfs"):
            headers.update(
                {"X-Linked-Etag": f'"{lfs["oid"]}"', "X-Linked-Size": str(entry["size"])}
            )
            if not (broken and broken[1] > 0) and not self.per_connection_bytes_per_s:
                # Ranges and HEAD included, straight from disk; huggingface_hub
                # names an LFS blob by X-Linked-Etag, not by this ETag.
                return web.FileResponse(file, headers=headers)
        headers.update({"ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"})
        size = entry["size"]
        start, end, status = 0, size - 1, 200
        wanted = request.http_range
        if wanted.start is not None or wanted.stop is not None:
            start, end, status = wanted.start or 0, min((wanted.stop or size) - 1, size - 1), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        with file.open("rb") as source:
            source.seek(start)
            body = source.read(end - start + 1)
        if broken and broken[1] > 0 and start <= broken[0] <= end:
            broken[1] -= 1
            await response.write(body[: broken[0] - start])
            request.transport.abort()  # the connection drops mid-file
            return response
        await self._send(response, body)
        return response

    async def _send(self, response: web.StreamResponse, body: bytes) -> None:
        """At most per_connection_bytes_per_s, as a CDN caps each flow."""
        rate = self.per_connection_bytes_per_s
        step = max(rate // 20, 64 * 1024) if rate else len(body) or 1
        for offset in range(0, len(body), step):
            await response.write(body[offset : offset + step])
            if rate:
                await asyncio.sleep(step / rate)
        await response.write_eof()


def _error(status: int, code: str, message: str) -> web.HTTPException:
    kind = {401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound}[status]
    return kind(
        headers={"X-Error-Code": code, "X-Error-Message": message},
        text=json.dumps({"error": message}),
        content_type="application/json",
    )


class HubProcess:
    """A LocalHub serving `root` from its own process."""

    def __init__(self, root: Path):
        self.root = root
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(root)], stdout=subprocess.PIPE, text=True
        )
        self.url = self.process.stdout.readline().strip()
        self._control = httpx.Client(base_url=self.url)

    def add(self, repo_id: str, files: dict[str, bytes], tokens: list[str] | None = None) -> str:
        """Write a repo; returns its commit."""
        folder = self.root / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in files.items():
            (folder / path).write_bytes(data)
        if tokens is not None:
            (folder / ".tokens").write_text("\n".join(tokens))
        return Repo(folder).commit

    def requests(self) -> list[list[str]]:
        return self._control.get("/_test/requests").json()

    def forget_requests(self) -> None:
        self._control.delete("/_test/requests")

    def cap_each_connection(self, bytes_per_s: int) -> None:
        """Throttle every file transfer to this rate per connection (0: none)."""
        self._control.post("/_test/throttle", json={"bytes_per_s": bytes_per_s})

    def break_connection(self, path: str, after_bytes: int, times: int) -> None:
        spec = {"path": path, "after_bytes": after_bytes, "times": times}
        self._control.post("/_test/break", json=spec)

    def close(self) -> None:
        self._control.close()
        self.process.terminate()
        self.process.wait()


def hub_layout(cache, folder_name: str, files: dict[str, bytes], commit: str = "a" * 40):
    """Write a model into a hub cache as huggingface_hub lays it out: blobs,
    a snapshot of links to them, and refs/main. Returns the snapshot."""
    folder = cache / folder_name
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def main(root: str) -> None:
    async def serve() -> None:
        runner = web.AppRunner(LocalHub(Path(root)).app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1])
