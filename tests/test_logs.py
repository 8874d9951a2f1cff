"""Structured logs: context fields, masked secrets, rotating JSON files, and the gateway's request
id in the log and in the SQL that serves the request."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import httpx
import orjson
import psycopg

from engine.config import load_settings
from engine.logs import configure_logging, log_context
from gateway.store import RequestTaggedCursor
from tests.gateway_helpers import World, configure, job, mint, running_gateway, settings_for


def test_json_file_carries_context_and_never_a_password(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, log_format="json", log_file_bytes=4096)
    configure_logging(settings, "unit")
    log = logging.getLogger("fieldsync.test")
    try:
        with log_context(org="acme", entity="job"), log_context(partition=2, offset=41):
            log.warning("cannot reach %s", "postgresql://app:s3cret@db:5432/crm password=hunter2")
        for n in range(200):  # past 4 KiB: the file rotates
            log.info("filler %d", n)
    finally:
        configure_logging(load_settings(data_dir=tmp_path))  # back to console only
    files = sorted((tmp_path / "logs").glob("unit-*.log*"))
    assert len(files) >= 2, files  # rotated
    records = [orjson.loads(line) for f in files for line in f.read_text().splitlines()]
    (warning,) = [r for r in records if r["level"] == "WARNING"]
    assert warning["org"] == "acme" and warning["entity"] == "job"
    assert warning["partition"] == 2 and warning["offset"] == 41
    assert warning["logger"] == "fieldsync.test" and "time" in warning
    text = "".join(f.read_text() for f in files)
    assert "s3cret" not in text and "hunter2" not in text
    assert "postgresql://app:***@db:5432/crm" in warning["message"]
    assert all("org" not in r for r in records if r["message"].startswith("filler"))


def test_request_id_is_echoed_checked_and_tags_the_sql(fresh_database: str, tmp_path: Path) -> None:
    world = World(fresh_database, f"o{uuid.uuid4().hex[:8]}")
    world.upsert("account", 1, owner_id="u1", name="first")
    world.upsert("job", 1, **job("u1"))
    configure(fresh_database, world.org)
    settings = settings_for(tmp_path)
    token = mint(world.org, "u1", ["technician"])
    with running_gateway(settings, fresh_database) as url:
        response = httpx.post(
            f"{url}/orgs/{world.org}/sync",
            json={"tokens": {}},
            headers={"authorization": f"Bearer {token}", "x-request-id": "dev42.sync-7"},
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "dev42.sync-7"
        hostile = httpx.get(
            f"{url}/orgs/{world.org}/metadata",
            headers={"authorization": f"Bearer {token}", "x-request-id": "x */ DROP TABLE t; --"},
        )
        assert hostile.status_code == 200
        replaced = hostile.headers["x-request-id"]
        assert replaced != "x */ DROP TABLE t; --" and replaced.isalnum()
    # the gateway's connections tag every statement of a request with its id
    with (
        psycopg.connect(fresh_database, cursor_factory=RequestTaggedCursor) as conn,
        log_context(request_id="dev42.sync-7"),
    ):
        seen = conn.execute("SELECT current_query()").fetchone()
    assert seen == ("/* request_id=dev42.sync-7 */ SELECT current_query()",)
    with psycopg.connect(fresh_database, cursor_factory=RequestTaggedCursor) as conn:
        assert conn.execute("SELECT current_query()").fetchone() == ("SELECT current_query()",)
