"""The faust-streaming projector app: consumer group, batching agent, topic refresh.

Workers started with the same ``FIELDSYNC_PROJECTOR_GROUP`` share the change topics'
partitions; a worker that stops hands its partitions to the others (consumer-group rebalance).
The agent takes batches (``FIELDSYNC_PROJECTOR_BATCH_SIZE`` messages or
``FIELDSYNC_PROJECTOR_BATCH_WITHIN_S`` seconds) and hands them to :class:`Projector`; faust
acknowledges a batch only after it returned, and commits offsets after that.

New topics. faust's pattern subscription does not work (faust-streaming issue #62) and adding
topics at run time is not reliable, so a timer lists the broker's topics every
``FIELDSYNC_PROJECTOR_TOPIC_REFRESH_S`` seconds; when change topics appeared, the worker
re-executes itself with the wider subscription. That is safe by construction — state lives
in staging and offsets, a restart is just a redelivery — and costs one rebalance.

Stops. The topics of a stopped org or entity (``fieldsync_control.stopped``, see
:mod:`engine.projections.stops`) are left out of the subscription, so their committed offsets
stay put. The worker that records a stop re-executes at once, without acknowledging the batch;
the others notice the stop at their next refresh, as they notice a ``fieldsync org resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import re
import sys
import time
from collections.abc import Collection, Sequence
from typing import Any, NoReturn

import faust
import psycopg
from kafka.admin import KafkaAdminClient

from engine.config import Settings
from engine.control import run_control_ddl
from engine.logs import logging_config
from engine.projections import faults
from engine.projections.decoding import EventDecoder, TopicRouter
from engine.projections.exceptions import SchemaUnavailable
from engine.projections.metrics import METRICS
from engine.projections.projector import (
    CONNECTION_LOST,
    COUNTS_DDL,
    DeadLetter,
    Projector,
    RawMessage,
)
from engine.projections.retention import purge_all
from engine.projections.stops import (
    Breaker,
    ProjectionStopped,
    Stop,
    read_breaker_pauses,
    read_stops,
    stopped_route,
)
from engine.projections.watchdog import StallWatch
from engine.runtime.faust_app import faust_app
from engine.runtime.kafka import client_options
from engine.runtime.placement import StagingServers
from engine.streams.framing import (
    SCHEMA_TOPIC,
    ConfluentRegistry,
    ConfluentResolver,
    FingerprintResolver,
    FramingError,
    schema_fingerprint,
)
from engine.streams.topics import TopicAdmin

log = logging.getLogger("fieldsync.projector")

CHANGE_TOPIC = re.compile(r"^fieldsync\.([a-z][a-z0-9_]{0,39})\.([a-z_][a-z0-9_]*)$")
NOT_ENTITIES = {"transaction", "dlq", "heartbeat"}


def change_topics(
    bootstrap_servers: str, extra: Sequence[str] = (), ready: Collection[str] = ()
) -> list[str]:
    """Every FieldSync change topic on the broker, plus mapped Debezium topics that exist.
    Topics in ``ready`` are known to have their partitions: only the others are described
    (describing a thousand topics took seconds per refresh)."""
    admin = KafkaAdminClient(
        **client_options(),
        bootstrap_servers=bootstrap_servers,
        client_id="fieldsync-projector-admin",
    )
    try:
        existing = set(admin.list_topics())
        ours = {
            t for t in existing if (m := CHANGE_TOPIC.match(t)) and m.group(2) not in NOT_ENTITIES
        }
        wanted = ours | (set(extra) & existing)
        known = wanted & set(ready)
        unknown = sorted(wanted - known)
        # a topic created a moment ago may be listed before its partitions are: subscribing
        # then yields an empty assignment, so such a topic waits for the next refresh
        described = admin.describe_topics(unknown) if unknown else []
    finally:
        admin.close()
    return sorted(
        known
        | {  # kafka-python 3 names the field "name", 2.x "topic"
            d.get("name") or d["topic"]
            for d in described
            if not d.get("error_code") and d.get("partitions")
        }
    )


class OrgRegistry:
    """The orgs the projector accepts and the staging server of each, read from every staging
    server's control schema (refreshed by the timer)."""

    def __init__(self, servers: StagingServers) -> None:
        self._servers = servers
        self.placement: dict[str, str] = {}
        self.debezium_topics: dict[str, tuple[str, str]] = {}
        self.stops: list[Stop] = []
        self.breaker_pauses: dict[str, float] = {}  # org → monotonic deadline

    @property
    def orgs(self) -> set[str]:
        return set(self.placement)

    def refresh(self) -> None:
        placement: dict[str, str] = {}
        topics: dict[str, tuple[str, str]] = {}
        stops: list[Stop] = []
        pauses: dict[str, float] = {}
        for server, dsn in self._servers.servers.items():
            with psycopg.connect(dsn) as conn:
                run_control_ddl(conn, COUNTS_DDL)
                rows = conn.execute(
                    "SELECT org, debezium_topics FROM fieldsync_control.orgs"
                ).fetchall()
                stops += read_stops(conn)
                pauses.update(read_breaker_pauses(conn))
            for org, mapping in rows:
                placement.setdefault(org, server)
                topics.update({topic: (org, entity) for topic, entity in (mapping or {}).items()})
        self.placement = placement
        self.debezium_topics = topics
        self.stops = stops
        self.breaker_pauses = pauses

    def breaker_paused(self, org: str) -> bool:
        until = self.breaker_pauses.get(org)
        return until is not None and until > time.monotonic()

    def consumable(self, topics: Sequence[str]) -> tuple[list[str], list[str]]:
        """(topics to consume, topics held back because their org or entity is stopped)."""
        router = TopicRouter(self.debezium_topics)
        keep: list[str] = []
        held: list[str] = []
        for topic in topics:
            (held if stopped_route(self.stops, router.route(topic)) else keep).append(topic)
        return keep, held

    def wanted_topics(
        self, bootstrap_servers: str, ready: Collection[str] = ()
    ) -> tuple[list[str], list[str]]:
        """(topics to consume, topics held back); ``ready``: see :func:`change_topics`."""
        return self.consumable(change_topics(bootstrap_servers, list(self.debezium_topics), ready))


def register_org(
    staging_dsn: str,
    org: str,
    *,
    retention_days: int = 30,
    debezium_topics: dict[str, str] | None = None,
) -> None:
    """Make an org known to the projector (provisioning will own this; see docs)."""
    import orjson

    with psycopg.connect(staging_dsn) as conn:
        run_control_ddl(conn, COUNTS_DDL)
        conn.execute(
            """
            INSERT INTO fieldsync_control.orgs (org, retention_days, debezium_topics)
            VALUES (%s, %s, %s)
            ON CONFLICT (org) DO UPDATE SET retention_days = EXCLUDED.retention_days,
                debezium_topics = EXCLUDED.debezium_topics
            """,
            (org, retention_days, orjson.dumps(debezium_topics or {}).decode()),
        )


def build_app(settings: Settings, bootstrap_servers: str, staging_dsn: str) -> faust.App:
    faults.arm(settings.fault_point)
    servers = StagingServers.from_settings(settings, staging_dsn)
    registry = OrgRegistry(servers)
    registry.refresh()
    subscribed, held = registry.wanted_topics(bootstrap_servers)
    for stop in registry.stops:
        log.warning("%s; not consumed until `fieldsync org resume`", stop.describe())
    while not subscribed:  # a worker may start before the first org is provisioned
        log.info(
            "no change topics to consume (%s stopped); waiting for an org to be provisioned"
            " or resumed",
            len(held),
        )
        time.sleep(settings.projector_topic_refresh_s)
        registry.refresh()
        subscribed, held = registry.wanted_topics(bootstrap_servers)
    app = faust_app(
        settings,
        settings.projector_group,
        bootstrap_servers,
        broker_commit_every=settings.projector_batch_size,
        broker_max_poll_records=max(500, settings.projector_batch_size),
        stream_buffer_maxsize=max(4096, settings.projector_batch_size * 2),
        producer_acks=-1,
        producer_max_request_size=max(settings.projector_max_message_bytes * 2, 1_048_576),
    )
    channel = app.topic(*subscribed, key_serializer="raw", value_serializer="raw", acks=True)
    dead_topics: dict[str, faust.TopicT] = {}
    schema_tail = SchemaTail(bootstrap_servers)
    known_schemas = FingerprintResolver(fetch_missing=schema_tail.fetch)
    confluent = (
        ConfluentResolver(ConfluentRegistry(settings.schema_registry_url))
        if settings.schema_registry_url
        else None
    )

    router = TopicRouter(registry.debezium_topics)
    decoder = EventDecoder(
        router,
        single_object=known_schemas,
        confluent=confluent,
        max_message_bytes=settings.projector_max_message_bytes,
    )

    async def send_dead_letters(letters: Sequence[DeadLetter]) -> None:
        futures = []
        for letter in letters:
            topic = dead_topics.get(letter.topic)
            if topic is None:
                topic = dead_topics[letter.topic] = app.topic(
                    letter.topic, key_serializer="raw", value_serializer="raw"
                )
                await asyncio.to_thread(_ensure_topic, bootstrap_servers, letter.topic, settings)
            futures.append(
                await topic.send(
                    key=letter.message.key, value=letter.message.value, headers=letter.headers()
                )
            )
        await app.producer.flush()
        for future in futures:
            await future

    projector = Projector(
        servers,
        decoder,
        router,
        lambda: registry.placement,
        send_dead_letters,
        breaker=Breaker(
            settings.projector_breaker_ratio,
            settings.projector_breaker_window,
            settings.projector_breaker_min_events,
        ),
        breaker_paused=registry.breaker_paused,
        idle_transaction_timeout_s=settings.projector_idle_transaction_timeout_s,
    )

    watch: StallWatch[Any] = StallWatch(settings.projector_stall_timeout_s)

    @app.agent(channel, concurrency=1)
    async def project(stream: faust.StreamT[Any]) -> None:
        # faust declares take_events on Stream only, not on the StreamT interface agents receive
        async for events in stream.take_events(  # type: ignore[attr-defined]
            settings.projector_batch_size, within=settings.projector_batch_within_s
        ):
            if faults.armed("after_offset_commit"):  # the batches before this one: committed
                await app.consumer.commit()
                faults.reached("after_offset_commit")
            messages = [
                RawMessage(
                    e.message.topic,
                    e.message.partition,
                    e.message.offset,
                    e.message.key,
                    e.message.value,
                    tuple((k, bytes(v)) for k, v in (e.message.headers or [])),
                )
                for e in events
            ]
            schema_tail.mark_batch()
            watch.batch_begins()
            try:
                report = await _handle_until_done(projector, messages, app)
            finally:
                watch.batch_ends()
            faults.reached("before_offset_commit")
            _update_lag(app)  # fresh after every batch; the refresh timer covers idle spells
            log.debug(
                "batch of %d: applied %d, skipped %d, dead-lettered %d",
                report.consumed,
                report.applied,
                report.duplicates,
                report.dead_lettered,
            )

    # faust's App.timer() is annotated as returning a bare Callable
    @app.timer(settings.projector_topic_refresh_s)  # type: ignore[untyped-decorator]
    async def refresh_topics() -> None:
        try:
            await asyncio.to_thread(registry.refresh)
        except psycopg.OperationalError as error:  # staging out of reach: keep what we know
            log.warning("orgs not refreshed (%s); trying again at the next refresh", error)
            return
        current, now_held = await asyncio.to_thread(
            registry.wanted_topics, bootstrap_servers, {*subscribed, *held}
        )
        new = sorted(set(current) - set(subscribed))
        gone = sorted(set(subscribed) - set(current))  # removed, or its org/entity stopped
        if new or gone:
            log.info(
                "change topics added %s, removed %s (held back as stopped: %s):"
                " restarting the worker",
                new,
                gone,
                now_held,
            )
            await _commit_acknowledged(app)
            _reexec()
        _update_lag(app)

    if watch.timeout_s > 0:

        @app.timer(max(1.0, watch.timeout_s / 4))  # type: ignore[untyped-decorator]  # faust: bare Callable
        async def watch_fetching() -> None:
            await _check_stall(app, watch)

    @app.timer(settings.retention_purge_interval_s)  # type: ignore[untyped-decorator]  # faust: bare Callable
    async def purge_below_horizon() -> None:
        """Move every org's retention horizon (idempotent: workers may all run it)."""
        for dsn in servers.servers.values():
            try:
                reports = await asyncio.to_thread(purge_all, dsn)
            except psycopg.OperationalError as error:  # next time, then
                log.warning("retention purge skipped (%s)", error)
                continue
            for report in reports:
                if report.error:
                    log.warning("org %s: purge failed: %s", report.org, report.error)

    return app


async def _handle_until_done(
    projector: Projector, messages: list[RawMessage], app: faust.App
) -> Any:
    """Retry a batch while its failure is one that waiting fixes (database or registry down);
    on anything else exit, so the restarted worker resumes from the committed offsets instead
    of faust restarting the agent past a batch that was never applied."""
    pause = 0.5
    while True:
        try:
            return await projector.handle(messages)
        except ProjectionStopped as stopped:
            log.info(
                "restarting the worker without the topics of %s",
                ", ".join(
                    s.org if s.entity is None else f"{s.org}.{s.entity}" for s in stopped.stops
                ),
            )
            await _commit_acknowledged(app)  # this batch is not: it comes again after resume
            _reexec()
        except (*CONNECTION_LOST, SchemaUnavailable) as error:
            log.warning("batch not applied (%s); retrying in %.1fs", error, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 4.0)  # back within seconds of the database's return
        except Exception:
            log.exception("projector stopped by an unexpected error; exiting for a clean restart")
            sys.stderr.flush()
            os._exit(70)


async def _check_stall(app: faust.App, watch: StallWatch[Any]) -> None:
    """Restart a worker whose consumer stopped fetching (:mod:`engine.projections.watchdog`);
    a batch running longer than the timeout gets its threads' stacks logged, once."""
    assigned = app.consumer.assignment()
    if assigned and faults.reached("fetching"):
        app.consumer.pause_partitions(assigned)
    running = watch.long_batch()
    if running is not None:
        log.warning("a batch has been running for %.0f s; where each thread is:", running)
        sys.stderr.flush()
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no file descriptor
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    if app.rebalancing:  # flow stops while the group rebalances: count from its end
        watch.moved()
        return
    if not assigned or not watch.worth_checking():
        return
    try:
        ends = await asyncio.wait_for(app.consumer.highwaters(*assigned), 30)
        tps = list(assigned)
        found = await asyncio.wait_for(asyncio.gather(*map(app.consumer.position, tps)), 30)
        positions = dict(zip(tps, found, strict=True))
    except Exception as error:  # broker out of reach: nothing to conclude from this check
        log.debug("stall check skipped (%s)", error)
        return
    stalled = watch.stalled(positions, ends)
    if stalled:
        log.error(
            "%d partition(s) have messages waiting at the broker, yet the worker has fetched"
            " nothing for %.0f s (%s): restarting the worker",
            len(stalled),
            watch.timeout_s,
            ", ".join(
                f"{tp.topic}[{tp.partition}] at {position} of {end}"
                for tp, (position, end) in sorted(stalled.items(), key=str)[:10]
            ),
        )
        await _commit_acknowledged(app)
        _reexec()


def _update_lag(app: faust.App) -> None:
    """Messages between the last one read and the partition's end, per assigned partition."""
    consumer = app.consumer
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        # faust keeps the read position private (Consumer only, not on ConsumerT)
        read = consumer._read_offset.get(tp)  # type: ignore[attr-defined]
        if highwater is not None:
            METRICS.lag.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - (read or -1) - 1)
            )


async def _commit_acknowledged(app: faust.App) -> None:
    """Commit the offsets of the batches handled so far before re-executing (else the new
    process gets them again, as duplicates); best effort."""
    try:
        await asyncio.wait_for(app.consumer.commit(), timeout=10)
    except Exception as error:  # the restart redelivers them: slower, not wrong
        log.warning("offsets not committed before the restart (%s)", error)


def _reexec() -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])  # noqa: S606 - the same command, again


def _ensure_topic(bootstrap_servers: str, topic: str, settings: Settings) -> None:
    admin = TopicAdmin(
        bootstrap_servers, partitions=1, replication_factor=settings.topic_replication_factor
    )
    try:
        admin.ensure([topic])
    finally:
        admin.close()


class SchemaTail:
    """The schema topic, read incrementally: each :meth:`fetch` returns the schemas published
    since the previous one (the first: all of them).

    A message's writer schema is published before the message, so a fetch started after the
    message was consumed finds it, or it will never be found. Every message of a batch was
    consumed before the batch was handed over: one fetch per batch (:meth:`mark_batch`)
    settles every unknown fingerprint in it, and a batch full of them costs one round trip,
    not one per message.
    """

    def __init__(self, bootstrap_servers: str) -> None:
        self._bootstrap = bootstrap_servers
        self._consumer: Any = None
        self._fetched_this_batch = False

    def mark_batch(self) -> None:
        self._fetched_this_batch = False

    async def fetch(self) -> dict[bytes, dict[str, Any]]:
        if self._fetched_this_batch:
            return {}
        try:
            found = await asyncio.to_thread(self._read_tail)
        except Exception as error:  # kafka-python raises its own errors, and OSError
            self.close()
            raise FramingError(f"reading {SCHEMA_TOPIC}: {error}", retryable=True) from error
        self._fetched_this_batch = True
        return found

    def _read_tail(self) -> dict[bytes, dict[str, Any]]:
        import orjson
        from kafka import KafkaConsumer, TopicPartition

        if self._consumer is None:
            consumer = KafkaConsumer(
                **client_options(),
                bootstrap_servers=self._bootstrap,
                enable_auto_commit=False,
                client_id="fieldsync-projector-schemas",
            )
            partitions = consumer.partitions_for_topic(SCHEMA_TOPIC) or set()
            if not partitions:
                consumer.close()
                return {}
            assignment = [TopicPartition(SCHEMA_TOPIC, p) for p in sorted(partitions)]
            consumer.assign(assignment)
            consumer.seek_to_beginning(*assignment)
            self._consumer = consumer
        consumer = self._consumer
        assignment = list(consumer.assignment())
        # the end is a lower bound on the embedded broker (the last batch's base offset + 1),
        # but a fetch returns whole batches: reading up to it reads the last one whole
        ends = consumer.end_offsets(assignment)
        found: dict[bytes, dict[str, Any]] = {}
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in assignment):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{SCHEMA_TOPIC} not read to its end within 30 s")
            for records in consumer.poll(timeout_ms=200, max_records=10_000).values():
                for record in records:
                    if record.value is not None:
                        schema = orjson.loads(record.value)
                        found[schema_fingerprint(schema)] = schema
        return found

    def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None


def run_worker(settings: Settings, bootstrap_servers: str, staging_dsn: str) -> None:
    """Run one projector worker until SIGTERM/SIGINT."""
    if settings.projector_uvloop and sys.platform != "win32":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = build_app(settings, bootstrap_servers, staging_dsn)
    if settings.projector_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.projector_metrics_port, addr=settings.projector_metrics_host)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=logging_config(settings, "projector", stream="stdout"),
    )
    worker.execute_from_commandline()


__all__ = ["build_app", "change_topics", "register_org", "run_worker"]
