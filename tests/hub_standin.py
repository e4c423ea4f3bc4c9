"""A local stand-in for the Hugging Face Hub's write API on 127.0.0.1 (repo creation, pre-upload,
commit), enough for huggingface_hub's ``create_repo`` + ``upload_folder``: every file is answered
``regular`` at pre-upload, so it arrives inline (base64) in the commit, and the stand-in keeps what it
received. Nothing leaves the machine."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self, token: str = "hf_standin"):
        self.token = token
        self.repos: dict[
            str, dict
        ] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str]] = []
        self.validated: list[dict] = []  # bodies of /api/validate-yaml (the model cards' metadata)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):  # noqa: N802
                stand_in.requests.append(("GET", self.path))
                self._send(404, {"error": "not in the stand-in"})

            def do_POST(self):  # noqa: N802
                stand_in.requests.append(("POST", self.path))
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "validate-yaml"]:  # the card's metadata, checked before the commit
                    req = json.loads(body)
                    stand_in.validated.append(req)
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'me'}/{req['name']}"
                    if repo in stand_in.repos:
                        return self._send(
                            409, {"error": "You already created this model repo", "url": self._url(repo)}
                        )
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    stand_in.repos[repo] = {"private": private, "files": {}, "commits": []}
                    return self._send(200, {"url": self._url(repo), "name": repo})
                if parts[:2] == ["api", "models"] and parts[-2] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ],
                            "commitOid": "0" * 40,
                        },
                    )
                if parts[:2] == ["api", "models"] and parts[-2] == "commit":
                    repo = "/".join(parts[2:-2])
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    store = stand_in.repos.setdefault(repo, {"private": False, "files": {}, "commits": []})
                    for line in lines:
                        if line["key"] == "file":
                            v = line["value"]
                            store["files"][v["path"]] = base64.b64decode(v["content"])
                        elif line["key"] == "header":
                            store["commits"].append(line["value"].get("summary"))
                    oid = f"{len(store['commits']):040d}"
                    return self._send(
                        200,
                        {"commitUrl": f"{self._url(repo)}/commit/{oid}", "commitOid": oid, "success": True},
                    )
                return self._send(404, {"error": f"not in the stand-in: {self.path}"})

            def _url(self, repo: str) -> str:
                return f"{stand_in.url}/{repo}"

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
