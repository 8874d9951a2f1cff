"""Capture: source PostgreSQL → Debezium-Avro change topics, decoded with plain fastavro."""

from __future__ import annotations

import base64
import uuid
from decimal import Decimal

import psycopg
import pytest

from engine.streams.exceptions import UnsupportedTable
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, events, fetch, new_org

ALL_TYPES = """
CREATE TABLE public.everything (
    id bigint PRIMARY KEY,
    small smallint, normal integer, big bigint,
    real_ real, dbl double precision,
    money_ numeric(12,2), anyscale numeric,
    flag boolean, label text, code varchar(8), fixed char(3),
    day date, at_local timestamp, at_ms timestamp(3), at timestamptz, at_s timestamptz, clock time,
    ident uuid, doc jsonb, doc_json json, tags text[], counts integer[], blob bytea
)
"""

ROW = {
    "id": 1,
    "small": -7,
    "normal": 2_000_000_000,
    "big": 9_000_000_000_000,
    "real_": 1.5,
    "dbl": -2.25,
    "money_": Decimal("-1234567890.12"),
    "anyscale": Decimal("3.14159265358979"),
    "flag": True,
    "label": "héllo, wörld",
    "code": "ABC",
    "fixed": "xy",
    "day": "2024-02-29",
    "at_local": "2024-02-29 13:14:15.123456",
    "at_ms": "2024-02-29 13:14:15.123",
    "at": "2024-02-29 13:14:15.5+02",
    "at_s": "2024-02-29 13:14:15+00",
    "clock": "13:14:15.25",
    "ident": "6ecd8c99-4036-403d-bf84-cf8400f67836",
    "doc": '{"a": [1, 2], "b": null}',
    "doc_json": '{"x":1}',
    "tags": ["a", None, "b,c"],
    "counts": [1, None, 3],
    "blob": b"\x00\xff\x10",
}

EXPECTED = {
    "id": 1,
    "small": -7,
    "normal": 2_000_000_000,
    "big": 9_000_000_000_000,
    "real_": 1.5,
    "dbl": -2.25,
    "money_": Decimal("-1234567890.12"),
    "anyscale": {"scale": 14, "value": (314159265358979).to_bytes(7, "big", signed=True)},
    "flag": True,
    "label": "héllo, wörld",
    "code": "ABC",
    "fixed": "xy ",
    "day": 19782,
    "at_local": 1709212455123456,
    "at_ms": 1709212455123,
    "at": "2024-02-29T11:14:15.500000Z",
    "at_s": "2024-02-29T13:14:15.000000Z",
    "clock": 47655250000,
    "ident": "6ecd8c99-4036-403d-bf84-cf8400f67836",
    "doc": '{"a": [1, 2], "b": null}',
    "doc_json": '{"x":1}',
    "tags": ["a", None, "b,c"],
    "counts": [1, None, 3],
    "blob": b"\x00\xff\x10",
}


def _insert(conn: psycopg.Connection, row: dict) -> None:
    columns = ", ".join(row)
    conn.execute(
        f"INSERT INTO public.everything ({columns}) VALUES ({', '.join(['%s'] * len(row))})",
        list(row.values()),
    )


def test_every_type_round_trips_through_snapshot_and_stream(
    fresh_database: str, bootstrap_servers: str
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(ALL_TYPES)
        _insert(conn, ROW)
        _insert(conn, {"id": 2})  # every optional column NULL
    spec = CaptureSpec(
        org=new_org(), source_dsn=fresh_database, entities={"everything": "public.everything"}
    )
    capture_once(spec, bootstrap_servers)  # snapshot: op r
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        _insert(conn, {**ROW, "id": 3})
    capture_once(spec, bootstrap_servers)  # stream: op c

    got = events(bootstrap_servers, f"fieldsync.{spec.org}.everything")
    by_id = {(e.value["op"], e.key["id"]): e.value for e in got}
    assert set(by_id) == {("r", 1), ("r", 2), ("c", 3)}
    assert by_id[("r", 1)]["after"] == EXPECTED
    assert by_id[("c", 3)]["after"] == {**EXPECTED, "id": 3}
    assert by_id[("r", 2)]["after"] == {name: (2 if name == "id" else None) for name in EXPECTED}
    snapshot = by_id[("r", 1)]["source"]
    assert snapshot["connector"] == "postgresql" and snapshot["name"] == "fieldsync"
    assert snapshot["schema"] == "public" and snapshot["table"] == "everything"
    assert {by_id[("r", 1)]["source"]["snapshot"], by_id[("r", 2)]["source"]["snapshot"]} == {
        "true",
        "last",
    }
    stream = by_id[("c", 3)]
    assert stream["source"]["snapshot"] == "false" and stream["source"]["txId"] > 0
    assert stream["source"]["lsn"] > snapshot["lsn"]
    assert stream["transaction"]["total_order"] == 1
    assert base64.b64encode(EXPECTED["blob"])  # bytes survive as bytes, not text


def test_operations_keys_tombstones_truncate_and_transactions(
    fresh_database: str, bootstrap_servers: str
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.item (id int PRIMARY KEY, name text NOT NULL, qty int)")
        conn.execute("CREATE TABLE public.note (a int, b text, body text, PRIMARY KEY (a, b))")
    spec = CaptureSpec(
        org=new_org(),
        source_dsn=fresh_database,
        entities={"item": "public.item", "note": "public.note"},
    )
    capture_once(spec, bootstrap_servers)
    with psycopg.connect(fresh_database) as conn:
        conn.execute("INSERT INTO item VALUES (1, 'one', 1), (2, 'two', 2)")
        conn.execute("INSERT INTO note VALUES (1, 'x', 'hi')")
        conn.commit()
        conn.execute("UPDATE item SET qty = 10 WHERE id = 1")
        conn.commit()
        conn.execute("UPDATE item SET id = 20 WHERE id = 2")  # primary-key change
        conn.commit()
        conn.execute("DELETE FROM item WHERE id = 1")
        conn.execute("UPDATE note SET b = 'y' WHERE a = 1")  # composite key change
        conn.commit()
        conn.execute("TRUNCATE item")
        conn.commit()
    capture_once(spec, bootstrap_servers)

    items = events(bootstrap_servers, f"fieldsync.{spec.org}.item")
    per_key: dict[int | None, list[str]] = {}
    for e in items:
        key = e.key["id"] if e.key else None
        per_key.setdefault(key, []).append("tombstone" if e.value is None else e.value["op"])
    assert per_key[1] == ["c", "u", "d", "tombstone"]
    assert per_key[2] == ["c", "d", "tombstone"]
    assert per_key[20] == ["c"]
    assert per_key[None] == ["t", "t"]  # one truncate per partition
    assert {e.partition for e in items if e.key is None} == {0, 1}

    update = next(e.value for e in items if e.value and e.value["op"] == "u")
    assert update["before"] is None and update["after"] == {"id": 1, "name": "one", "qty": 10}
    delete = next(e for e in items if e.value and e.value["op"] == "d" and e.key["id"] == 1)
    assert delete.value["before"] == {
        "id": 1,
        "name": None,
        "qty": None,
    }  # REPLICA IDENTITY DEFAULT: key only
    moved = next(e for e in items if e.value and e.value["op"] == "d" and e.key["id"] == 2)
    assert "__debezium.newkey" in moved.headers
    created = next(e for e in items if e.key and e.key["id"] == 20)
    assert created.value["after"]["name"] == "two" and "__debezium.oldkey" in created.headers
    assert all(e.headers.get("fieldsync.epoch") for e in items)

    notes = events(bootstrap_servers, f"fieldsync.{spec.org}.note")
    note_ops: dict[tuple[int, str], list[str | None]] = {}
    for e in notes:
        note_ops.setdefault((e.key["a"], e.key["b"]), []).append(e.value["op"] if e.value else None)
    assert note_ops == {(1, "x"): ["c", "d", None], (1, "y"): ["c"]}

    # transaction metadata: BEGIN/END per transaction, END counts per collection
    txns = events(bootstrap_servers, f"fieldsync.{spec.org}.transaction")
    ends = {e.value["id"]: e.value for e in txns if e.value["status"] == "END"}
    begins = {e.value["id"] for e in txns if e.value["status"] == "BEGIN"}
    assert begins == set(ends) and len(ends) == 5
    shapes = sorted(
        (
            v["event_count"],
            tuple(sorted((c["data_collection"], c["event_count"]) for c in v["data_collections"])),
        )
        for v in ends.values()
    )
    assert shapes == [
        (1, (("public.item", 1),)),  # truncate: one event (copied to each partition)
        (1, (("public.item", 1),)),  # update qty
        (2, (("public.item", 2),)),  # key change: delete + create
        (3, (("public.item", 1), ("public.note", 2))),  # delete item, note key change
        (3, (("public.item", 2), ("public.note", 1))),  # the inserts
    ]
    mixed = next(
        v
        for v in ends.values()
        if (v["event_count"] == 3 and v["data_collections"][0]["event_count"] == 1)
        or (v["event_count"] == 3 and v["data_collections"][-1]["event_count"] == 2)
    )
    blocks = [
        e.value["transaction"]
        for e in items + notes
        if e.value and e.value["transaction"] and e.value["transaction"]["id"] == mixed["id"]
    ]
    assert sorted(b["total_order"] for b in blocks) == [1, 2, 3]
    assert sorted(b["data_collection_order"] for b in blocks) == [1, 1, 2]


def test_new_nullable_column_gives_compatible_schema_version(
    fresh_database: str, bootstrap_servers: str
) -> None:
    import io

    import fastavro

    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, a text)")
        conn.execute("INSERT INTO t VALUES (1, 'before')")
    spec = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"t": "public.t"})
    capture_once(spec, bootstrap_servers)
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("ALTER TABLE t ADD COLUMN b numeric(5,1)")
        conn.execute("INSERT INTO t VALUES (2, 'after', 1.5)")
    capture_once(spec, bootstrap_servers)
    got = sorted(events(bootstrap_servers, f"fieldsync.{spec.org}.t"), key=lambda e: e.key["id"])
    assert [e.value["after"] for e in got] == [
        {"id": 1, "a": "before"},
        {"id": 2, "a": "after", "b": Decimal("1.5")},
    ]

    from tests.capture_helpers import PlainDecoder

    decoder = PlainDecoder(bootstrap_servers)
    records = sorted(
        fetch(bootstrap_servers, f"fieldsync.{spec.org}.t"),
        key=lambda r: decoder.decode(r.key)["id"],
    )
    old_writer, new_writer = (decoder.schemas[r.value[2:10]] for r in records)
    assert old_writer is not new_writer
    # the new schema reads data written with the old one: backward compatible
    old_data = io.BytesIO(records[0].value[10:])
    assert fastavro.schemaless_reader(old_data, old_writer, new_writer)["after"] == {
        "id": 1,
        "a": "before",
        "b": None,
    }


def test_unsupported_tables_are_named(fresh_database: str, bootstrap_servers: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.nokey (a int)")
        conn.execute("CREATE TABLE public.odd (id int PRIMARY KEY, spot point)")
    org = new_org()
    with pytest.raises(
        UnsupportedTable, match=rf"org {org}, entity nokey: table public.nokey has no primary key"
    ):
        capture_once(
            CaptureSpec(org=org, source_dsn=fresh_database, entities={"nokey": "public.nokey"}),
            bootstrap_servers,
        )
    with pytest.raises(
        UnsupportedTable, match=rf"org {org}, entity odd, column spot: column type oid 600"
    ):
        capture_once(
            CaptureSpec(org=org, source_dsn=fresh_database, entities={"odd": "public.odd"}),
            bootstrap_servers,
        )
    with pytest.raises(UnsupportedTable, match="does not exist"):
        capture_once(
            CaptureSpec(org=org, source_dsn=fresh_database, entities={"ghost": "public.ghost"}),
            bootstrap_servers,
        )


def test_idle_source_slot_keeps_advancing(fresh_database: str, bootstrap_servers: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE public.elsewhere (id int)")
    spec = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"t": "public.t"})
    capture_once(spec, bootstrap_servers)

    def confirmed() -> str:
        with psycopg.connect(fresh_database) as conn:
            return conn.execute(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                (spec.slot_name,),
            ).fetchone()[0]

    before = confirmed()
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO elsewhere SELECT generate_series(1, 1000)"
        )  # WAL, but nothing captured
    capture_once(spec, bootstrap_servers)
    with psycopg.connect(fresh_database) as conn:
        advanced = conn.execute("SELECT %s::pg_lsn > %s::pg_lsn", (confirmed(), before)).fetchone()[
            0
        ]
    assert advanced
    assert uuid.UUID  # keeps the import used for type checks


def test_broker_that_lost_its_log_gets_a_new_snapshot(fresh_database: str, tmp_path) -> None:
    from engine.runtime.embedded import EmbeddedBroker, free_port

    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")
    broker.start()
    try:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 50) i")
        spec = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"t": "public.t"})
        first = capture_once(spec, broker.bootstrap_servers)
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("UPDATE t SET v = 'changed' WHERE id <= 10")
        capture_once(spec, broker.bootstrap_servers)
        old_epoch = first.epoch

        broker.restart()  # memory storage: every topic and offset is gone
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("DELETE FROM t WHERE id > 40")
        again = capture_once(spec, broker.bootstrap_servers)

        assert again.stats.snapshots == 1 and again.epoch != old_epoch
        got = events(broker.bootstrap_servers, f"fieldsync.{spec.org}.t")
        assert {e.value["op"] for e in got} == {"r"}
        rows = {e.key["id"]: e.value["after"]["v"] for e in got}
        assert rows == {i: ("changed" if i <= 10 else f"v{i}") for i in range(1, 41)}
        assert {e.headers["fieldsync.epoch"] for e in got} == {str(again.epoch).encode()}
    finally:
        broker.stop()


def test_unchanged_toast_value_carries_debeziums_placeholder(
    fresh_database: str, bootstrap_servers: str
) -> None:
    # incompressible enough to be stored out of line
    big = "".join(f"{i:08x}" for i in range(40_000))
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE doc (id int PRIMARY KEY, title text, body text, blob bytea)")
        conn.execute("INSERT INTO doc VALUES (1, 'first', %s, %s)", (big, big.encode()))
    spec = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"doc": "public.doc"})
    capture_once(spec, bootstrap_servers)
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("UPDATE doc SET title = 'second' WHERE id = 1")  # body and blob untouched
    capture_once(spec, bootstrap_servers)
    snapshot, update = (e.value for e in events(bootstrap_servers, f"fieldsync.{spec.org}.doc"))
    assert snapshot["after"]["body"] == big
    assert update["op"] == "u" and update["after"]["title"] == "second"
    assert update["after"]["body"] == "__debezium_unavailable_value"
    assert update["after"]["blob"] == b"__debezium_unavailable_value"
