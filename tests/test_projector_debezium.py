"""Real Debezium output (JSON converter with and without schemas) projects into staging through
a per-org mapping of Debezium topic names to entities."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from engine.projections.app import register_org
from tests.capture_helpers import new_org
from tests.projector_helpers import live_rows, projector_env, start_projector, wait_until

DATA = Path(__file__).parent / "data" / "debezium"


def _raw(name: str) -> bytes:
    return (DATA / name).read_bytes().rstrip(b"\n")


def test_debezium_json_topics_project(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    org = new_org()
    persons, widgets = f"pg{org}.public.persons", f"cqrs{org}.public.widgets"
    admin = KafkaAdminClient(bootstrap_servers=fresh_broker)
    admin.create_topics([NewTopic(persons, 1, 1), NewTopic(widgets, 1, 1)])
    admin.close()
    register_org(fresh_database, org, debezium_topics={persons: "person", widgets: "widget"})

    create = json.loads(_raw("pg_persons_2.7.1_create.value.json"))
    update = {
        "schema": create["schema"],
        "payload": json.loads(_raw("pg_persons_2.7.1_update.payload.json")),
    }
    key_schema = json.loads(_raw("pg_persons_2.7.1_create.key.json"))["schema"]
    producer = KafkaProducer(bootstrap_servers=fresh_broker, acks="all")
    producer.send(
        persons,
        key=_raw("pg_persons_2.7.1_create.key.json"),
        value=_raw("pg_persons_2.7.1_create.value.json"),
    )
    producer.send(
        persons,
        key=json.dumps({"schema": key_schema, "payload": {"id": 1}}).encode(),
        value=json.dumps(update).encode(),
    )
    for name in ("create", "update", "delete"):
        producer.send(widgets, key=b'{"id":"w1"}', value=_raw(f"cqrs_widgets_2.7.3_{name}.json"))
    producer.send(widgets, key=b'{"id":"w1"}', value=None)  # Debezium's tombstone after the delete
    producer.flush()
    producer.close()

    log = tmp_path / "projector.log"
    worker = start_projector(projector_env(fresh_broker, fresh_database), log)
    try:
        wait_until(
            lambda: (
                live_rows(
                    fresh_database,
                    f"SELECT id, name, age FROM org_{org}.person WHERE NOT _fs_deleted",
                )
                == {1: ("Tom", 30), 2: ("Paul", 25)}
            ),
            90,
            "Debezium JSON with schema in staging",
            log,
        )
        wait_until(
            lambda: (
                live_rows(fresh_database, f"SELECT id, _fs_deleted FROM org_{org}.widget")
                == {"w1": (True,)}
            ),
            30,
            "schemaless Debezium JSON in staging",
            log,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    types = dict(
        live_rows(
            fresh_database,
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            f"WHERE table_schema = 'org_{org}' AND column_name IN ('id', 'name', 'age', 'active')",
        )
    )
    assert types == {
        "person.id": ("integer",),
        "person.name": ("text",),
        "person.age": ("integer",),
        "widget.id": ("text",),
        "widget.name": ("text",),
        "widget.active": ("boolean",),
    }
