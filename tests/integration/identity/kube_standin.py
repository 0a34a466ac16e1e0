"""A STAND-IN for the Kubernetes API server: no real cluster runs on this machine.

It implements only what the identity unit's Secret sink uses, as the real API server does it:
GET/POST/PUT of core/v1 Secrets under /api/v1/namespaces/NS/secrets[/NAME], bearer-token
authentication, resourceVersion bumps and 409 Conflict when a PUT carries a stale one, 404 with
a Status object for a missing Secret. Everything else answers 404. The official `kubernetes`
client talks to it over HTTP on 127.0.0.1 with a kubeconfig like any cluster's.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN = "stand-in-token"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}


class StandInKubeApiServer:
    """Stand-in Kubernetes API server (Secrets only) for tests; see the module docstring."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.version = 100
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                server.requests.append((method, self.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._reply(401, status(401, "Unauthorized", "Unauthorized"))
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] != ["api", "v1", "namespaces"] or len(parts) not in (5, 6) \
                        or parts[4] != "secrets":
                    self._reply(404, status(404, "NotFound", "the server could not find the requested resource"))
                    return
                ns = parts[3]
                name = parts[5] if len(parts) == 6 else None
                body = None
                if method in ("POST", "PUT"):
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with server.lock:
                    self._apply(method, ns, name, body)

            def _apply(self, method: str, ns: str, name: str | None, body: Any) -> None:
                key = (ns, name or (body or {}).get("metadata", {}).get("name", ""))
                current = server.secrets.get(key)
                if method == "GET":
                    if current is None:
                        self._reply(404, status(404, "NotFound", f'secrets "{key[1]}" not found'))
                    else:
                        self._reply(200, current)
                elif method == "POST":
                    if current is not None:
                        self._reply(409, status(409, "AlreadyExists", f'secrets "{key[1]}" already exists'))
                        return
                    self._store(key, body, 201)
                elif method == "PUT":
                    if current is None:
                        self._reply(404, status(404, "NotFound", f'secrets "{key[1]}" not found'))
                        return
                    sent = body.get("metadata", {}).get("resourceVersion")
                    if sent != current["metadata"]["resourceVersion"]:
                        self._reply(409, status(409, "Conflict", "the object has been modified"))
                        return
                    self._store(key, body, 200)

            def _store(self, key: tuple[str, str], body: dict[str, Any], code: int) -> None:
                server.version += 1
                body["metadata"]["resourceVersion"] = str(server.version)
                body["metadata"]["namespace"] = key[0]
                server.secrets[key] = body
                self._reply(code, body)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StandInKubeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path: Path, token: str = TOKEN) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "agent", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "agent"}}],
        }))
        return path
