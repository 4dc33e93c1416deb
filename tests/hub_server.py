"""A local stand-in for the Hugging Face Hub, for the push tests (a test fixture, not part of the library).

It answers the calls an upload and a download make, and nothing else: repo create, preupload, the LFS batch API
(answering the `basic` transfer) and its PUT, commit (inline and LFS files), model info, tree, resolve. Files
land in memory (`HubServer.repos`). Tokens in `HubServer.tokens` may write; `refused/*` repos answer 403.

huggingface_hub 2.x uploads through Xet whenever `hf_xet` is installed, without asking the server, so no server
answer can steer it to LFS (the LFS batch endpoint is not even called); clients of this server run with
`HF_HUB_DISABLE_XET=1`, set in their environment like `HF_ENDPOINT`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

TOKEN = "hf_local_test_token"
# the header the Hub sends with a 404 for a repo it does not have (huggingface_hub raises RepositoryNotFoundError on it)
REPO_NOT_FOUND = {"X-Error-Code": "RepoNotFound"}


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of files committed through LFS
    commits: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS objects by sha256
    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    calls: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        def denied(request: Request, repo_id: str | None = None) -> Response | None:
            token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if token not in self.tokens:
                return _error(401, "Invalid credentials in Authorization header")
            if repo_id is not None and repo_id.startswith("refused/"):
                return _error(403, "You don't have the rights to create a model under the namespace \"refused\"")
            return None

        @app.middleware("http")
        async def record(request: Request, call_next):
            self.calls.append(f"{request.method} {request.url.path}")
            return await call_next(request)

        @app.post("/api/repos/create")
        async def create(request: Request):
            body = await request.json()
            repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
            if (error := denied(request, repo_id)) is not None:
                return error
            if repo_id in self.repos:
                return _error(409, "You already created this model repo")
            self.repos[repo_id] = Repo()
            return {"url": f"{self.url}/{repo_id}", "name": repo_id}

        @app.post("/api/validate-yaml")
        async def validate_yaml():
            return {}

        @app.post("/api/models/{namespace}/{name}/preupload/{revision}")
        async def preupload(namespace: str, name: str, revision: str, request: Request):
            repo_id = f"{namespace}/{name}"
            if (error := denied(request, repo_id)) is not None:
                return error
            files = (await request.json())["files"]
            # like the Hub: binary weights go through LFS, small text files inline
            return {"files": [{"path": f["path"], "uploadMode": "lfs" if _is_lfs(f) else "regular",
                               "shouldIgnore": False} for f in files]}

        @app.post("/{namespace}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(namespace: str, name: str, request: Request):
            if (error := denied(request)) is not None:
                return error
            body = await request.json()
            assert "basic" in body.get("transfers", ["basic"])
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
                       for o in body["objects"] if o["oid"] not in self.blobs]
            return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                                media_type="application/vnd.git-lfs+json")

        @app.put("/lfs-upload/{oid}")
        async def lfs_upload(oid: str, request: Request):
            data = await request.body()
            if hashlib.sha256(data).hexdigest() != oid:
                return _error(400, "sha256 mismatch")
            self.blobs[oid] = data
            return Response(status_code=200)

        @app.post("/api/models/{namespace}/{name}/commit/{revision}")
        async def commit(namespace: str, name: str, revision: str, request: Request):
            repo_id = f"{namespace}/{name}"
            if (error := denied(request, repo_id)) is not None:
                return error
            repo = self.repos.get(repo_id)
            if repo is None:
                return _error(404, "Repository not found", headers=REPO_NOT_FOUND)
            message = ""
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    message = value["summary"]
                elif item["key"] == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                    repo.lfs.pop(value["path"], None)
                elif item["key"] == "lfsFile":
                    if value["oid"] not in self.blobs:
                        return _error(422, f"LFS object {value['oid']} was never uploaded")
                    repo.files[value["path"]] = self.blobs[value["oid"]]
                    repo.lfs[value["path"]] = value["oid"]
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    repo.files.pop(value["path"], None)
            sha = hashlib.sha1(f"{repo_id}{len(repo.commits)}{time.time()}".encode()).hexdigest()
            repo.commits.append(sha)
            repo.messages.append(message)
            return {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

        @app.get("/api/models/{namespace}/{name}")
        @app.get("/api/models/{namespace}/{name}/revision/{revision}")
        async def info(namespace: str, name: str, revision: str = "main"):
            repo = self.repos.get(f"{namespace}/{name}")
            if repo is None:
                return _error(404, "Repository not found", headers=REPO_NOT_FOUND)
            return {"id": f"{namespace}/{name}", "sha": repo.sha, "private": False,
                    "siblings": [{"rfilename": path} for path in sorted(repo.files)]}

        @app.get("/api/models/{namespace}/{name}/tree/{revision}")
        async def tree(namespace: str, name: str, revision: str):
            repo = self.repos.get(f"{namespace}/{name}")
            if repo is None:
                return _error(404, "Repository not found", headers=REPO_NOT_FOUND)
            entries = []
            for path, data in sorted(repo.files.items()):
                entry = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}
                if path in repo.lfs:
                    entry["lfs"] = {"oid": repo.lfs[path], "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return entries

        @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(namespace: str, name: str, revision: str, path: str, request: Request):
            repo = self.repos.get(f"{namespace}/{name}")
            if repo is None or path not in repo.files:
                return _error(404, "Entry not found", headers={"X-Error-Code": "EntryNotFound"})
            data = repo.files[path]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{_git_oid(data)}"', "Content-Length": str(len(data))}
            if path in repo.lfs:
                headers.update({"X-Linked-Etag": f'"{repo.lfs[path]}"', "X-Linked-Size": str(len(data))})
            body = b"" if request.method == "HEAD" else data
            return Response(content=body, headers=headers, media_type="application/octet-stream")

        return app

    def start(self) -> tuple[uvicorn.Server, threading.Thread]:
        """Serve on 127.0.0.1 on a free port, in a daemon thread; returns once it answers."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the local Hub server did not start")
            time.sleep(0.05)
        return server, thread


def _is_lfs(file: dict) -> bool:
    return file["path"].endswith((".safetensors", ".bin", ".png")) or file["size"] > 10_000_000


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
