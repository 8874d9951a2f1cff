"""A stand-in for a Confluent schema registry (none can run here): the REST subset capture uses.

``POST /subjects/{subject}/versions`` registers (same schema → same id, as the real registry),
``GET /schemas/ids/{id}`` fetches. Schemas are compared by their canonical JSON.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Registry:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def register(self, subject: str, schema: str) -> int:
        canonical = json.dumps(json.loads(schema), sort_keys=True)
        with self.lock:
            schema_id = self.ids.setdefault(canonical, len(self.ids) + 1)
            self.schemas[schema_id] = schema
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id


@contextmanager
def schema_registry() -> Iterator[tuple[str, _Registry]]:
    registry = _Registry()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            parts = self.path.strip("/").split("/")
            if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions":
                return self._reply(404, {"error_code": 404, "message": "not found"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._reply(200, {"id": registry.register(parts[1], body["schema"])})

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            if (
                len(parts) == 3
                and parts[:2] == ["schemas", "ids"]
                and int(parts[2]) in registry.schemas
            ):
                return self._reply(200, {"schema": registry.schemas[int(parts[2])]})
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", registry
    finally:
        server.shutdown()
        server.server_close()
