"""The projector's guards, batch by batch (``Projector.handle`` without faust or a broker):
values staging cannot hold are isolated and dead-lettered with a precise reason, the error-rate
breaker stops an org instead of dead-lettering its traffic, a changed column type stops its
entity before anything is written, and ``resume`` lets them go on."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from engine.projections.app import register_org
from engine.projections.decoding import EventDecoder, TopicRouter
from engine.projections.projector import BatchReport, DeadLetter, Projector, RawMessage
from engine.projections.stops import (
    ERROR_RATE_EXCEEDED,
    INCOMPATIBLE_SCHEMA,
    Breaker,
    ProjectionStopped,
    pause_breaker,
    read_stops,
    resume,
)
from engine.runtime.placement import MAIN, StagingServers
from engine.streams.framing import SCHEMA_TOPIC, FingerprintResolver
from gateway.store import ensure_schema
from tests.bad_input_helpers import (
    COLUMNS,
    ROW_COLUMNS,
    EventWriter,
    counts,
    create_topics,
    healthy_row,
    read_topic,
)
from tests.capture_helpers import new_org
from tests.gateway_helpers import mint, running_gateway, settings_for
from tests.projector_helpers import (
    assert_change_log_sound,
    projector_env,
    start_projector,
    wait_until,
)

ORG, OTHER = "acme", "other"


class Harness:
    """A projector over one staging database, fed batches built by :class:`EventWriter`s."""

    def __init__(self, dsn: str, *, breaker: Breaker | None = None) -> None:
        self.dsn = dsn
        self.writers = {org: EventWriter(None, org) for org in (ORG, OTHER)}
        for org in self.writers:
            register_org(dsn, org)
        self.encoders = {
            (org, entity): writer.encoder(entity)
            for org, writer in self.writers.items()
            for entity in ("a", "b")
        }
        self.letters: list[DeadLetter] = []
        self.offsets: dict[str, int] = {}
        router = TopicRouter({})

        async def known() -> dict[bytes, dict[str, Any]]:
            return {fp: s for w in self.writers.values() for fp, s in w.schemas.items()}

        async def send(letters: Sequence[DeadLetter]) -> None:
            self.letters.extend(letters)

        self.projector = Projector(
            StagingServers(dsn),
            EventDecoder(
                router, single_object=FingerprintResolver(known), max_message_bytes=65_536
            ),
            router,
            lambda: {ORG: MAIN, OTHER: MAIN},
            send,
            breaker=breaker,
            breaker_paused=lambda org: org in self.paused,
        )
        self.paused: set[str] = set()

    def message(self, org: str, entity: str, key: bytes | None, value: bytes) -> RawMessage:
        topic = f"fieldsync.{org}.{entity}"
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        return RawMessage(topic, 0, offset, key, value)

    def change(
        self, org: str, entity: str, op: str, row: dict[str, Any], *, encoder: Any = None
    ) -> RawMessage:
        key, value = self.writers[org].change(encoder or self.encoders[(org, entity)], op, row)
        return self.message(org, entity, key, value)

    def handle(self, messages: Sequence[RawMessage]) -> BatchReport:
        return asyncio.run(self.projector.handle(messages))


def staged(dsn: str, org: str, entity: str) -> dict[int, tuple[Any, ...]]:
    try:
        with psycopg.connect(dsn) as conn:
            return {
                row[0]: row
                for row in conn.execute(
                    f"SELECT {ROW_COLUMNS} FROM org_{org}.{entity} WHERE NOT _fs_deleted"
                )
            }
    except psycopg.errors.UndefinedTable:
        return {}


def as_staged(row: dict[str, Any]) -> tuple[Any, ...]:
    import orjson

    return (row["id"], row["name"], row["amount"], row["small"], orjson.loads(row["doc"]))


def test_values_staging_cannot_hold_are_dead_lettered_with_a_reason(fresh_database: str) -> None:
    harness = Harness(fresh_database, breaker=Breaker(0.5, 1000, 100))
    harness.handle([harness.change(ORG, "a", "c", healthy_row(999, 0))])  # creates the table
    with psycopg.connect(fresh_database) as conn:
        conn.execute(f"ALTER TABLE org_{ORG}.a ADD CONSTRAINT not_12345 CHECK (small <> 12345)")
    oracle: dict[int, dict[str, Any]] = {999: healthy_row(999, 0)}
    batch: list[RawMessage] = []
    for version in range(3):
        for key in range(100):
            oracle[key] = healthy_row(key, version)
            batch.append(harness.change(ORG, "a", "c" if version == 0 else "u", oracle[key]))
    poison: dict[int, tuple[dict[str, Any], str]] = {  # key → (change, reason it is refused)
        200: ({"name": "nul\x00inside"}, "bad_value"),  # text cannot hold NUL
        201: ({"small": 40_000}, "type_overflow"),  # smallint
        202: ({"amount": Decimal("99999999.99")}, "type_overflow"),  # numeric(8,2)
        203: ({"doc": '{"unterminated": '}, "bad_value"),  # JSON that does not parse
        204: ({"doc": '"\\u0000"'}, "bad_value"),  # jsonb cannot hold \u0000
        # what only staging refuses: JSON with a lone surrogate, a constraint an operator added
        205: ({"doc": '["\\ud800"]'}, "bad_value"),
        206: ({"small": 12_345}, "bad_value"),
        5: ({"doc": '"\\udfff"'}, "bad_value"),  # the newest change of a key with older ones
    }
    expected: dict[int, str] = {}  # offset → reason
    for key, (change, reason) in poison.items():
        row = {**healthy_row(key, 9), **change}
        message = harness.change(ORG, "a", "u" if key < 100 else "c", row)
        batch.insert(key % 97 * 3, message)
        expected[message.offset] = reason
    value = harness.change(ORG, "a", "c", oracle[7]).value
    assert value is not None
    empty_key = harness.message(ORG, "a", b"", value)
    batch.append(empty_key)
    expected[empty_key.offset] = "missing_key"

    report = harness.handle(batch)

    assert {letter.message.offset: letter.reason for letter in harness.letters} == expected
    assert len(harness.letters) == len(expected)
    refused = [letter for letter in harness.letters if "staging refused" in letter.detail]
    assert len(refused) == 3
    assert sorted(letter.detail.split("(")[1][:5] for letter in refused) == [
        "22P02",
        "22P02",
        "23514",
    ]
    assert staged(fresh_database, ORG, "a") == {k: as_staged(r) for k, r in oracle.items()}
    assert report.applied == 300 and report.dead_lettered == len(poison) + 1
    consumed, applied, duplicates, dead = counts(fresh_database, ORG)[(ORG, "a")]
    assert (consumed, applied, duplicates, dead) == (len(batch) + 1, 301, 0, len(poison) + 1)
    assert_change_log_sound(fresh_database, ORG, "a")

    again = harness.handle(batch)  # redelivered: nothing changes, the poison goes again
    assert (again.applied, again.duplicates, again.dead_lettered) == (0, 300, len(poison) + 1)
    assert staged(fresh_database, ORG, "a") == {k: as_staged(r) for k, r in oracle.items()}


def writers_of(dsn: str, org: str, entity: str, keys: Sequence[int]) -> set[int]:
    """The transactions that last wrote these rows (``xmin``)."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            f"SELECT xmin::text FROM org_{org}.{entity} WHERE id = ANY(%s)", (list(keys),)
        )
        return {int(row[0]) for row in found}


def test_a_batch_is_one_transaction_and_a_refused_value_sends_it_entity_by_entity(
    fresh_database: str,
) -> None:
    harness = Harness(fresh_database)
    groups = [(org, entity) for org in (ORG, OTHER) for entity in "ab"]
    oracle: dict[tuple[str, str], dict[int, dict[str, Any]]] = {g: {} for g in groups}

    def batch(version: int, keys: range) -> list[RawMessage]:
        messages = []
        for key in keys:  # interleaved: every entity has the same shape and the same keys
            for org, entity in groups:
                row = {**healthy_row(key, version), "name": f"{org}.{entity}.{key}.{version}"}
                oracle[(org, entity)][key] = row
                messages.append(harness.change(org, entity, "c" if version == 0 else "u", row))
        return messages

    report = harness.handle(batch(0, range(20)))
    assert report.applied == 80 and report.dead_lettered == 0
    for org, entity in groups:  # no entity's rows ended up in another's table
        assert staged(fresh_database, org, entity) == {
            k: as_staged(r) for k, r in oracle[(org, entity)].items()
        }
        assert_change_log_sound(fresh_database, org, entity)
    together = set().union(*(writers_of(fresh_database, o, e, range(20)) for o, e in groups))
    assert len(together) == 1  # one transaction wrote all four entities

    # a value only staging refuses in (OTHER, "a"): that batch's transaction rolls back and
    # each entity is written alone; only the refused change is dead-lettered
    messages = batch(1, range(10))
    poison = harness.change(OTHER, "a", "u", {**healthy_row(3, 2), "doc": '["\\ud800"]'})
    report = harness.handle([*messages[:17], poison, *messages[17:]])
    assert report.applied == 40 and report.dead_lettered == 1
    assert [(letter.message.offset, letter.reason) for letter in harness.letters] == [
        (poison.offset, "bad_value")
    ]
    for org, entity in groups:
        assert staged(fresh_database, org, entity) == {
            k: as_staged(r) for k, r in oracle[(org, entity)].items()
        }
        assert_change_log_sound(fresh_database, org, entity)
    alone = {g: writers_of(fresh_database, *g, range(10)) for g in groups}
    assert sum(len(w) for w in alone.values()) == len(set().union(*alone.values()))  # disjoint
    assert [len(alone[g]) for g in groups if g != (OTHER, "a")] == [1, 1, 1]
    assert len(alone[(OTHER, "a")]) > 1  # split in halves around the refused change
    assert counts(fresh_database) == {
        (ORG, "a"): (30, 30, 0, 0),
        (ORG, "b"): (30, 30, 0, 0),
        (OTHER, "a"): (31, 30, 0, 1),
        (OTHER, "b"): (30, 30, 0, 0),
    }


def test_the_breaker_stops_an_org_instead_of_dead_lettering_its_traffic(
    fresh_database: str,
) -> None:
    harness = Harness(fresh_database, breaker=Breaker(0.5, 1000, 100))
    harness.handle([harness.change(ORG, "a", "c", healthy_row(k, 0)) for k in range(200)])

    def garbage(count: int) -> list[RawMessage]:
        return [harness.message(ORG, "a", b"k", b"\x07garbage") for _ in range(count)]

    # below the threshold: dead letters as usual
    report = harness.handle([*garbage(20), harness.change(OTHER, "a", "c", healthy_row(1, 0))])
    assert report.dead_lettered == 20 and len(harness.letters) == 20
    before = counts(fresh_database)

    # 250 more failures: 270 of 470 events in the window failed, more than half
    other = [harness.change(OTHER, "a", "c", healthy_row(k, 1)) for k in range(2, 50)]
    with pytest.raises(ProjectionStopped) as stopped:
        harness.handle(garbage(250) + other)
    (stop,) = stopped.value.stops
    assert (stop.org, stop.entity, stop.code) == (ORG, None, ERROR_RATE_EXCEEDED)
    assert "bad_magic" in stop.detail
    assert len(harness.letters) == 20  # nothing of the failing batch was dead-lettered
    assert counts(fresh_database) == before  # nor counted: it is not acknowledged
    with psycopg.connect(fresh_database) as conn:
        (recorded,) = read_stops(conn)
    assert (recorded.org, recorded.entity, recorded.code) == (ORG, None, ERROR_RATE_EXCEEDED)
    assert recorded.since is not None

    # an operator lets garbage through for a while: dead letters instead of a stop
    harness.paused.add(ORG)
    report = harness.handle(garbage(250))
    assert report.dead_lettered == 250


def test_a_flood_of_values_staging_refuses_trips_the_breaker_early(fresh_database: str) -> None:
    harness = Harness(fresh_database, breaker=Breaker(0.5, 1000, 100))
    harness.handle([harness.change(ORG, "a", "c", healthy_row(k, 0)) for k in range(10)])
    flood = [  # JSON with lone surrogates: only staging refuses it
        harness.change(ORG, "a", "c", {**healthy_row(k, 1), "doc": '"\\ud800"'})
        for k in range(100, 400)
    ]
    with pytest.raises(ProjectionStopped) as stopped:
        harness.handle(flood)
    (stop,) = stopped.value.stops
    assert stop.code == ERROR_RATE_EXCEEDED
    assert "at least 156 of 300" in stop.detail and "staging refused" in stop.detail
    assert harness.letters == []


def test_a_changed_column_type_stops_its_entity_before_anything_is_written(
    fresh_database: str,
) -> None:
    harness = Harness(fresh_database)
    first = [harness.change(ORG, e, "c", healthy_row(k, 0)) for e in "ab" for k in range(50)]
    harness.handle(first)
    with psycopg.connect(fresh_database) as conn:
        watermarks: dict[str, int] = dict(
            conn.execute(f"SELECT entity, version FROM org_{ORG}._fs_entities").fetchall()
        )
    rows = {e: staged(fresh_database, ORG, e) for e in "ab"}
    before = counts(fresh_database)

    # column "name" becomes an integer at the source: a new writer schema; the batch holds
    # changes from before the type change (text) and after it (integer)
    retyped = harness.writers[ORG].encoder(
        "a", tuple(("name", 23, -1) if c[0] == "name" else c for c in COLUMNS)
    )
    old_typed = [
        harness.change(ORG, "a", "u", {**healthy_row(1, 1), "name": "17"}),
        harness.change(ORG, "a", "u", {**healthy_row(2, 1), "name": "not a number"}),
    ]
    new_typed = [
        harness.change(ORG, "a", "u", {**healthy_row(k, 1), "name": 40 + k}, encoder=retyped)
        for k in (3, 4)
    ]
    other_entity = [harness.change(ORG, "b", "u", healthy_row(4, 1))]
    batch = [*old_typed, *other_entity, *new_typed]
    with pytest.raises(ProjectionStopped) as stopped:
        harness.handle(batch)
    (stop,) = stopped.value.stops
    assert (stop.org, stop.entity, stop.code) == (ORG, "a", INCOMPATIBLE_SCHEMA)
    assert "column name changed type from text to integer" in stop.detail
    assert stop.conflicts == (("name", "text", "integer"),)
    with psycopg.connect(fresh_database) as conn:
        assert dict(conn.execute(f"SELECT entity, version FROM org_{ORG}._fs_entities")) == (
            watermarks
        )
        assert [s.entity for s in read_stops(conn, ORG)] == ["a"]
    assert {e: staged(fresh_database, ORG, e) for e in "ab"} == rows  # nothing written
    assert counts(fresh_database) == before and harness.letters == []

    # as long as it is stopped, the entity stops again (a worker that has not re-subscribed)
    with pytest.raises(ProjectionStopped):
        harness.handle(new_typed)

    # the operator makes staging match and resumes the entity; the batch is redelivered,
    # split otherwise: the changes from before the type change are cast (one does not cast)
    with psycopg.connect(fresh_database) as conn:
        conn.execute(
            f"ALTER TABLE org_{ORG}.a ALTER COLUMN name TYPE integer"
            " USING CASE WHEN name ~ '^[0-9]+$' THEN name::integer END"
        )
        (resumed,) = resume(conn, ORG, "a")
    assert resumed.conflicts == (("name", "text", "integer"),)
    report = harness.handle(old_typed)
    assert (report.applied, report.dead_lettered) == (1, 1)
    (letter,) = harness.letters
    assert letter.reason == "bad_value" and letter.message == old_typed[1]
    assert "invalid input syntax for type integer" in letter.detail
    report = harness.handle([*other_entity, *new_typed])
    assert report.applied == 3 and report.dead_lettered == 0
    names = {k: row[1] for k, row in staged(fresh_database, ORG, "a").items()}
    assert (names[1], names[2], names[3], names[4], names[5]) == (17, None, 43, 44, None)
    assert staged(fresh_database, ORG, "b")[4] == as_staged(healthy_row(4, 1))
    for entity in "ab":
        assert_change_log_sound(fresh_database, ORG, entity)


def test_breaker_window_arithmetic() -> None:
    breaker = Breaker(0.5, window=10, min_events=4)
    assert not breaker.would_trip("x", [True, True, True])  # fewer than min_events
    assert breaker.would_trip("x", [True, True, True, False])  # 3 of 4
    assert not breaker.would_trip("x", [True, True, False, False])  # exactly half: not more
    breaker.add("x", [False] * 10)
    assert not breaker.would_trip("x", [True] * 5)  # 5 of the latest 10
    assert breaker.would_trip("x", [True] * 6)  # the oldest successes left the window
    breaker.add("x", [True] * 4)
    assert breaker.failure_share("x") == (4, 10)
    assert not breaker.would_trip("y", [True] * 3)  # per org
    never = Breaker(1.0, window=10, min_events=1)
    assert not never.would_trip("x", [True] * 10)


def test_pausing_the_breaker_is_recorded_per_org(fresh_database: str) -> None:
    from engine.projections.stops import read_breaker_pauses

    with psycopg.connect(fresh_database, autocommit=True) as conn:
        pause_breaker(conn, ORG, 60)
        deadlines = read_breaker_pauses(conn)
    assert set(deadlines) == {ORG} and deadlines[ORG] > time.monotonic() + 50


# -- a real projector: stops, status, /readyz, resume ---------------------------------------------


def _cli(env: dict[str, str], *args: str) -> str:
    fieldsync = str(Path(sys.executable).parent / "fieldsync")
    done = subprocess.run([fieldsync, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_stopped_orgs_and_entities_lose_nothing_and_resume(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    flood, evolve, steady = new_org(), new_org(), new_org()
    topics = {
        (flood, "a"): f"fieldsync.{flood}.a",
        (evolve, "b1"): f"fieldsync.{evolve}.b1",
        (evolve, "b2"): f"fieldsync.{evolve}.b2",
        (steady, "a"): f"fieldsync.{steady}.a",
    }
    for org in (flood, evolve, steady):
        register_org(fresh_database, org)
    create_topics(fresh_broker, list(topics.values()))
    writers = {org: EventWriter(fresh_broker, org) for org in (flood, evolve, steady)}
    encoders = {(org, e): writers[org].encoder(e) for org, e in topics}
    oracle: dict[tuple[str, str], dict[int, dict[str, Any]]] = {t: {} for t in topics}
    produced: dict[str, int] = dict.fromkeys(writers, 0)

    def send(org: str, entity: str, row: dict[str, Any], *, encoder: Any = None) -> None:
        op = "u" if row["id"] in oracle[(org, entity)] else "c"
        key, value = writers[org].change(encoder or encoders[(org, entity)], op, row)
        writers[org].send(topics[(org, entity)], key, value)
        oracle[(org, entity)][row["id"]] = row
        produced[org] += 1

    def applied(org: str) -> bool:
        """Staging holds the newest change of every key the org sent."""
        return all(
            staged(fresh_database, org, entity) == {k: as_staged(r) for k, r in rows.items()}
            for (owner, entity), rows in oracle.items()
            if owner == org
        )

    for org, entity in topics:
        for key in range(20 if org == flood else 100):
            send(org, entity, healthy_row(key, 0))
    for writer in writers.values():
        writer.kafka.flush()
    log = tmp_path / "projector.log"
    env = projector_env(fresh_broker, fresh_database)
    worker = start_projector(env, log)
    try:
        wait_until(lambda: all(applied(o) for o in writers), 90, "the first changes", log)

        # a producer of the flood org writes with a schema it never published (column "note"
        # added); the evolving org's b1.name changes type from text to integer
        unpublished = EventWriter(None, flood, lsn=writers[flood].lsn)
        noted = unpublished.encoder("a", (*COLUMNS, ("note", 25, -1)))
        for key in range(1000, 1400):
            row = {**healthy_row(key, 1), "note": f"note {key}"}
            _key, value = unpublished.change(noted, "c", row)
            writers[flood].send(topics[(flood, "a")], _key, value)
            oracle[(flood, "a")][key] = row
            produced[flood] += 1
        for key in (1, 2, 3):
            send(evolve, "b1", {**healthy_row(key, 1), "name": str(key + 10)})
        retyped = writers[evolve].encoder(
            "b1", tuple(("name", 23, -1) if c[0] == "name" else c for c in COLUMNS)
        )
        for key in (3, 4, 5):
            send(evolve, "b1", {**healthy_row(key, 2), "name": key + 20}, encoder=retyped)
        for writer in writers.values():
            writer.kafka.flush()

        def stops() -> dict[tuple[str, str | None], str]:
            with psycopg.connect(fresh_database) as conn:
                return {(s.org, s.entity): s.code for s in read_stops(conn)}

        wait_until(lambda: len(stops()) == 2, 60, "two stops", log)
        assert stops() == {
            (flood, None): ERROR_RATE_EXCEEDED,
            (evolve, "b1"): INCOMPATIBLE_SCHEMA,
        }
        # the others go on: the steady org and the evolving org's other entity
        for key in range(100, 150):
            send(steady, "a", healthy_row(key, 0))
            send(evolve, "b2", healthy_row(key, 0))
        for writer in writers.values():
            writer.kafka.flush()
        wait_until(lambda: applied(steady), 60, "the steady org's changes", log)
        wait_until(lambda: len(staged(fresh_database, evolve, "b2")) == 150, 60, "evolve.b2", log)
        b1_before = staged(fresh_database, evolve, "b1")
        assert {k: r[1] for k, r in b1_before.items() if k < 6} == {
            k: f"n{k}.0" for k in range(6)
        }  # nothing of the stopped entity written
        dead_before_stop = len(read_topic(fresh_broker, f"fieldsync.{flood}.dlq"))
        assert dead_before_stop < 100  # the breaker's minimum: then it stopped the org
        assert len(staged(fresh_database, flood, "a")) == 20 + 0  # the flood is not applied

        # visible in the admin status and /readyz (200: degraded, not unavailable)
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            ensure_schema(conn)
        with running_gateway(settings_for(tmp_path), fresh_database) as url:
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 200, ready.text
            body = ready.json()
            assert body["status"] == "degraded" and len(body["degraded"]) == 2
            assert any(f"org {flood}: stopped (error_rate_exceeded)" in d for d in body["degraded"])
            admin = {"authorization": f"Bearer {mint(evolve, 'ops', [], scope='fieldsync:admin')}"}
            status = httpx.get(f"{url}/orgs/{evolve}/admin/status", headers=admin).json()
            (stopped,) = status["stopped"]
            assert (stopped["entity"], stopped["code"]) == ("b1", INCOMPATIBLE_SCHEMA)
            assert stopped["conflicts"] == [
                {"column": "name", "staging_type": "text", "incoming_type": "integer"}
            ]
            admin = {"authorization": f"Bearer {mint(flood, 'ops', [], scope='fieldsync:admin')}"}
            status = httpx.get(f"{url}/orgs/{flood}/admin/status", headers=admin).json()
            assert [(s["entity"], s["code"]) for s in status["stopped"]] == [
                (None, ERROR_RATE_EXCEEDED)
            ]

            # the fixes: the missing schema published; staging's column altered
            for fingerprint, schema in unpublished.schemas.items():
                writers[flood].kafka.send(
                    SCHEMA_TOPIC, key=fingerprint.hex().encode(), value=orjson.dumps(schema)
                ).get(30)
            with psycopg.connect(fresh_database, autocommit=True) as conn:
                conn.execute(
                    f"ALTER TABLE org_{evolve}.b1 ALTER COLUMN name TYPE integer"
                    " USING CASE WHEN name ~ '^[0-9]+$' THEN name::integer END"
                )
            assert "resumed org" in _cli(env, "org", "resume", flood)
            assert "resumed org" in _cli(env, "org", "resume", evolve, "--entity", "b1")
            assert "nothing was stopped" in _cli(env, "org", "resume", steady)
            if dead_before_stop:  # what went to the dead-letter topic before the stop
                _cli(env, "dlq", "replay", "--org", flood)

            def resumed() -> bool:
                b1 = staged(fresh_database, evolve, "b1")
                return len(staged(fresh_database, flood, "a")) == 420 and {
                    k: b1[k][1] for k in range(1, 6)
                } == {1: 11, 2: 12, 3: 23, 4: 24, 5: 25}

            wait_until(resumed, 90, "resumed orgs", log)
            assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
            status = httpx.get(f"{url}/orgs/{flood}/admin/status", headers=admin).json()
            assert status["stopped"] == []
    finally:
        for writer in writers.values():
            writer.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    # nothing lost: staging holds every change
    flooded = staged(fresh_database, flood, "a")
    assert set(flooded) == set(oracle[(flood, "a")])
    with psycopg.connect(fresh_database) as conn:
        notes: dict[int, str] = dict(
            conn.execute(f"SELECT id, note FROM org_{flood}.a WHERE id >= 1000").fetchall()
        )
    assert notes == {k: f"note {k}" for k in range(1000, 1400)}
    names = {k: r[1] for k, r in staged(fresh_database, evolve, "b1").items()}
    assert {k: names[k] for k in range(7)} == {0: None, 1: 11, 2: 12, 3: 23, 4: 24, 5: 25, 6: None}
    assert staged(fresh_database, steady, "a") == {
        k: as_staged(r) for k, r in oracle[(steady, "a")].items()
    }
    for org in writers:
        for consumed, applied_, duplicates, dead in counts(fresh_database, org).values():
            assert consumed == applied_ + duplicates + dead
    for org, entity in topics:
        assert_change_log_sound(fresh_database, org, entity)
