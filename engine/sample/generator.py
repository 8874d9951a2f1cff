"""The sample CRM source: create it, fill it deterministically, then keep changing it.

The demo, the tests and the benchmarks all run against this one source, so capture sees every
column type it has to map on realistic, related rows, and a benchmark at a given seed and scale
always measures the same data. :func:`fill` bulk-loads with binary ``COPY``, so 100k accounts
(a million rows) take about a minute, bound by generating the values in Python; :func:`churn`
makes a paced, seeded stream of inserts, updates, deletes and ownership changes like the users
of a CRM would.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.copy import QueuedLibpqWriter
from psycopg.types.json import Jsonb

from engine.exceptions import FieldSyncError

SCHEMA = "crm"
"""PostgreSQL schema holding the sample tables."""

TABLES: tuple[str, ...] = (
    "business_units",
    "teams",
    "users",
    "team_members",
    "accounts",
    "contacts",
    "opportunities",
    "activities",
)
"""All sample tables, parents before children (the order to fill them in)."""

RECORD_TABLES: tuple[str, ...] = ("accounts", "contacts", "opportunities", "activities")
"""Tables whose rows have an owner and a team and that the change generator edits."""

PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "business_units": ("business_unit_id",),
    "teams": ("team_id",),
    "users": ("user_id",),
    "team_members": ("team_id", "user_id"),
    "accounts": ("account_id",),
    "contacts": ("contact_id",),
    "opportunities": ("opportunity_id",),
    "activities": ("activity_id",),
}

# Business columns per record table, in the order the synthesiser returns their values.
# Keys, parent links, owner and timestamps are added around them by fill and churn.
_FIELDS: dict[str, tuple[str, ...]] = {
    "accounts": (
        "account_number", "name", "industry_code", "number_of_employees", "annual_revenue",
        "credit_limit", "latitude", "longitude", "website", "do_not_email", "tags",
        "custom_fields", "description", "state_code",
    ),
    "contacts": (
        "first_name", "last_name", "email", "job_title", "phone_numbers", "birth_date",
        "do_not_call", "photo",
    ),
    "opportunities": (
        "name", "stage", "state_code", "estimated_value", "close_probability",
        "estimated_close_date", "actual_close_date",
    ),
    "activities": (
        "activity_type", "subject", "body", "priority", "duration_minutes", "attachment_bytes",
        "scheduled_start", "local_start", "is_completed",
    ),
}  # fmt: skip
_LINKS: dict[str, tuple[str, ...]] = {
    "accounts": (),
    "contacts": ("account_id",),
    "opportunities": ("account_id", "contact_id"),
    "activities": ("regarding_account_id", "regarding_opportunity_id"),
}
_OWNER = ("owner_id", "owning_team_id")
_STAMPS = ("created_on", "modified_on")

# Columns that change together in one update (an opportunity that is won gets a close date).
_UPDATE_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "accounts": (
        ("annual_revenue", "number_of_employees"), ("tags", "custom_fields"), ("description",),
        ("website", "do_not_email"), ("credit_limit",), ("state_code",),
    ),
    "contacts": (
        ("email",), ("job_title",), ("phone_numbers", "do_not_call"), ("photo",), ("last_name",),
    ),
    "opportunities": (
        ("stage", "close_probability"), ("state_code", "actual_close_date"),
        ("estimated_value", "estimated_close_date"), ("name",),
    ),
    "activities": (
        ("is_completed", "duration_minutes"), ("scheduled_start", "local_start"), ("priority",),
        ("subject", "body"), ("attachment_bytes",),
    ),
}  # fmt: skip

# How often each record table is the target of a change: activities are the busiest.
_TABLE_WEIGHTS: dict[str, dict[str, float]] = {
    "insert": {"accounts": 0.08, "contacts": 0.22, "opportunities": 0.20, "activities": 0.50},
    "update": {"accounts": 0.20, "contacts": 0.25, "opportunities": 0.25, "activities": 0.30},
    "delete": {"accounts": 0.05, "contacts": 0.20, "opportunities": 0.20, "activities": 0.55},
    "reassign": {"accounts": 0.30, "contacts": 0.20, "opportunities": 0.30, "activities": 0.20},
    "team": {"accounts": 0.30, "contacts": 0.20, "opportunities": 0.30, "activities": 0.20},
}

# Fixed time range of the filled history, so that the same seed gives the same timestamps.
_HISTORY_START = datetime(2021, 1, 1, tzinfo=UTC)
_HISTORY_END = datetime(2025, 1, 1, tzinfo=UTC)

_FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elif", "Farid", "Greta", "Hugo", "Inês", "Jonas", "Kaito",
    "Lena", "Mateo", "Nora", "Omar", "Paula", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera",
    "Wei", "Ximena", "Yusuf", "Zoë", "Amara", "Björn", "Chloé", "Dmitri", "Esra", "Finn",
)  # fmt: skip
_LAST_NAMES = (
    "Andersen", "Bauer", "Costa", "Dubois", "Eriksson", "Fischer", "García", "Haddad", "Ito",
    "Jansen", "Kowalski", "Larsen", "Müller", "Novak", "O'Brien", "Petrov", "Quinn", "Rossi",
    "Schmidt", "Tanaka", "Ueda", "Varga", "Weber", "Öztürk", "Zhang", "Nakamura", "Okafor",
)  # fmt: skip
_COMPANY_PREFIXES = (
    "Northwind", "Contoso", "Fabrikam", "Adventure Works", "Litware", "Tailspin", "Wingtip",
    "Alpine", "Blue Yonder", "Coho", "Datum", "Fourth Coffee", "Lucerne", "Margie's",
    "Proseware", "Trey", "Woodgrove", "Humongous", "Graphic Design", "Wide World",
)  # fmt: skip
_COMPANY_NOUNS = (
    "Logistics", "Foods", "Energy", "Health", "Systems", "Motors", "Textiles", "Pharma",
    "Construction", "Retail", "Travel", "Insurance", "Media", "Robotics", "Farms", "Water",
)  # fmt: skip
_COMPANY_SUFFIXES = ("Ltd", "GmbH", "Inc.", "AG", "S.A.", "B.V.", "Oy", "plc", "& Co.", "KG")
_BUSINESS_UNITS = (
    "Headquarters", "Sales DACH", "Sales Nordics", "Field Service EMEA", "Sales North America",
    "Service APAC", "Sales LATAM", "Key Accounts", "Public Sector", "Partner Channel",
)  # fmt: skip
_TEAM_WORDS = ("Field Service", "Inside Sales", "Key Account", "Support", "Install", "Renewals")
_JOB_TITLES = (
    "Purchasing Manager", "CFO", "CEO", "Operations Lead", "IT Director", "Field Technician",
    "Office Manager", "Sales Representative", "Account Executive", "Procurement Officer",
    "Facility Manager", "Head of Maintenance",
)  # fmt: skip
_CITIES = (  # name, latitude, longitude, UTC offset in minutes
    ("Berlin", 52.52, 13.405, 60), ("London", 51.507, -0.128, 0),
    ("New York", 40.713, -74.006, -300), ("São Paulo", -23.55, -46.633, -180),
    ("Tokyo", 35.68, 139.69, 540), ("Sydney", -33.87, 151.21, 600),
    ("Nairobi", -1.286, 36.817, 180), ("Mumbai", 19.076, 72.877, 330),
    ("Toronto", 43.65, -79.38, -300), ("Madrid", 40.4168, -3.7038, 60),
)  # fmt: skip
_TAGS = (
    "key-account", "partner", "reseller", "prospect", "churn-risk", "vip", "public-sector",
    "smb", "enterprise", "newsletter", "service-contract", "multi-site",
)  # fmt: skip
_CHANNELS = ("email", "phone", "visit", "portal")
_BIRTH_DATES_FROM = date(1950, 1, 1)
_STAGES = ("qualify", "develop", "propose", "negotiate", "close")
_VOCABULARY = """
    the a to of and for on with we our your please regarding attached proposal contract order
    delivery invoice service visit site technician maintenance schedule quote price discount
    renewal meeting call follow up next week monday tuesday friday budget approval sign off
    install replacement spare parts warranty ticket issue resolved pending customer request
    update status report region team manager quarter forecast pipeline volume rollout pilot
    training onboarding feedback agreed confirm thanks regards best kind available tomorrow
    morning afternoon calendar invite agenda minutes action items deadline priority urgent
    inventory warehouse shipment tracking number reference account number payment terms net
    thirty days credit note adjustment escalation support level agreement response time hours
    on-site remote access firmware version upgrade compatible hardware network outage backup
"""
_WORDS = tuple(_VOCABULARY.split())
_SENTENCE_POOL = 4096

T = TypeVar("T", bound=Hashable)


class SampleSourceError(FieldSyncError):
    """The sample source is not in a state the requested operation can work with."""

    code = "sample_source"


@dataclass(frozen=True)
class SampleCounts:
    """Rows per sample table, as written by :func:`fill`."""

    business_units: int
    teams: int
    users: int
    team_members: int
    accounts: int
    contacts: int
    opportunities: int
    activities: int

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ChangeMix:
    """Relative weights of the kinds of change :func:`churn` makes (need not sum to 1).

    ``reassign`` gives a record a new owner, ``team`` a new owning team, ``membership`` adds a
    user to a team or removes one: the changes that move records between devices in sync.
    """

    insert: float = 0.30
    update: float = 0.42
    delete: float = 0.10
    reassign: float = 0.08
    team: float = 0.06
    membership: float = 0.04

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 or not math.isfinite(w) for w in weights.values()):
            raise ValueError(f"change weights must be finite and >= 0, got {weights}")
        if sum(weights.values()) <= 0:
            raise ValueError("at least one change weight must be > 0")

    def weights(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


CHANGE_KINDS: tuple[str, ...] = tuple(ChangeMix().weights())
ROW_OPS: tuple[str, ...] = ("insert", "update", "delete")


@dataclass(frozen=True)
class Change:
    """One logical change: its kind, the table it is about and that row's key (as text)."""

    kind: str
    table: str
    key: str


@dataclass(frozen=True)
class ChurnStats:
    """What a :func:`churn` run did, and whether it kept up with the requested rate."""

    changes: int
    transactions: int
    elapsed_s: float
    target_rate: float
    max_lag_s: float  # furthest a change started behind its schedule
    by_kind: dict[str, int]  # logical changes per kind (see ChangeMix)
    by_table: dict[str, dict[str, int]]  # rows inserted/updated/deleted per table

    @property
    def achieved_rate(self) -> float:
        return self.changes / self.elapsed_s if self.elapsed_s > 0 else 0.0


def schema_sql() -> str:
    """The DDL of the sample source (package data, so it ships with the wheel)."""
    return resources.files("engine.sample").joinpath("schema.sql").read_text(encoding="utf-8")


def create_source(dsn: str) -> None:
    """Create schema ``crm`` and its tables if missing; safe to run again and concurrently."""
    with psycopg.connect(dsn) as conn:
        # CREATE ... IF NOT EXISTS is not safe against a concurrent creator; serialise them.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('fieldsync.sample.create_source'))")
        conn.execute(schema_sql())


# --- values -------------------------------------------------------------------------------------


class _Synth:
    """Plausible CRM values from one seeded Random, shared by fill and churn so both look alike.

    Fill makes millions of draws, so the hot paths use ``random()`` through :meth:`pick` and
    :meth:`between_int`, several times cheaper than ``choice``/``randint``/``randrange``.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rand = rng.random
        # Texts are drawn from pools of sentences: composing each from words would dominate fill
        # time. The pool is large enough that a long body has few repeats inside pglz's 4 kB
        # window, so it still compresses only about 2:1, like real mail, and gets TOASTed.
        self._sentences = [self.sentence(5, 14) for _ in range(_SENTENCE_POOL)]
        self._sentence_chars = sum(len(s) + 1 for s in self._sentences) / _SENTENCE_POOL
        self._subjects = [self.sentence(3, 7)[:-1] for _ in range(_SENTENCE_POOL // 8)]

    def index(self, size: int) -> int:
        """An index into a sequence of ``size`` items."""
        return int(self.rand() * size)

    def pick(self, items: Sequence[Any]) -> Any:
        return items[int(self.rand() * len(items))]

    def between_int(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return low + int(self.rand() * (high - low + 1))

    def new_id(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def between(self, start: datetime, end: datetime) -> datetime:
        """A whole second in [start, end]."""
        seconds = max(0, int((end - start).total_seconds()))
        return start + timedelta(seconds=self.between_int(0, seconds))

    def person(self) -> tuple[str, str]:
        return self.pick(_FIRST_NAMES), self.pick(_LAST_NAMES)

    def sentence(self, low: int, high: int) -> str:
        words = self.rng.choices(_WORDS, k=self.between_int(low, high))
        return " ".join(words).capitalize() + "."

    def text(self, chars: int) -> str:
        """Paragraphs of two to six sentences, about ``chars`` long in all."""
        count = max(1, round(chars / self._sentence_chars))
        sentences = self.rng.choices(self._sentences, k=count)
        paragraphs: list[str] = []
        i = 0
        while i < count:
            size = self.between_int(2, 6)
            paragraphs.append(" ".join(sentences[i : i + size]))
            i += size
        return "\n\n".join(paragraphs)

    def money(self, low: int, high: int) -> Decimal:
        """An amount with cents, between ``low`` and ``high`` units."""
        return Decimal(self.between_int(low * 100, high * 100)).scaleb(-2)

    def account(self, account_id: uuid.UUID) -> tuple[Any, ...]:
        rand, pick, num = self.rand, self.pick, self.between_int
        city, lat, lon, _ = pick(_CITIES)
        prefix, noun = pick(_COMPANY_PREFIXES), pick(_COMPANY_NOUNS)
        slug = f"{prefix}{noun}".lower().replace(" ", "").replace("'", "")
        custom = {
            "segment": pick(("smb", "mid-market", "enterprise")),
            "city": city,
            "score": num(0, 100),
            "sla_hours": pick((4, 8, 24, 48)),
            "preferred_channels": self.rng.sample(_CHANNELS, num(1, 3)),
        }
        return (
            f"ACC-{account_id.hex[:16].upper()}",
            f"{prefix} {noun} {pick(_COMPANY_SUFFIXES)}",
            num(1, 30) if rand() < 0.9 else None,
            pick((5, 12, 40, 120, 800, 4_000, 25_000)) + num(0, 49),
            self.money(50_000, 900_000_000) if rand() < 0.8 else None,
            # Unconstrained numeric: varying scale, sometimes more digits than numeric(12,2).
            Decimal(self.rng.getrandbits(num(8, 56))).scaleb(-num(0, 6)),
            round(lat + 0.6 * rand() - 0.3, 6) if rand() < 0.85 else None,
            round(lon + 0.6 * rand() - 0.3, 6) if rand() < 0.85 else None,
            f"https://www.{slug}.example" if rand() < 0.7 else None,
            rand() < 0.1,
            sorted(self.rng.sample(_TAGS, num(0, 3))),
            Jsonb(custom) if rand() < 0.9 else None,
            self.text(num(80, 600)) if rand() < 0.6 else None,
            0 if rand() < 0.95 else 1,
        )

    def contact(self) -> tuple[Any, ...]:
        rand, pick, num = self.rand, self.pick, self.between_int
        first, last = self.person()
        mail = f"{first}.{last}{num(1, 999)}@customer.example".lower().replace("'", "")
        phones = [f"+{num(1, 99)} {num(0, 10**9 - 1):09d}" for _ in range(num(1, 3))]
        return (
            first,
            last,
            mail if rand() < 0.9 else None,
            pick(_JOB_TITLES) if rand() < 0.8 else None,
            phones if rand() < 0.85 else None,
            _BIRTH_DATES_FROM + timedelta(days=num(0, 18_000)) if rand() < 0.4 else None,
            rand() < 0.05,
            self.rng.randbytes(num(64, 512)) if rand() < 0.1 else None,
        )

    def opportunity(self, anchor: datetime) -> tuple[Any, ...]:
        rand, pick, num = self.rand, self.pick, self.between_int
        roll = rand()
        state = 0 if roll < 0.6 else 1 if roll < 0.85 else 2  # open, won, lost
        close = anchor.date() + timedelta(days=num(7, 270))
        topic = pick(("rollout", "renewal", "upgrade", "pilot", "service contract"))
        return (
            f"{pick(_COMPANY_NOUNS)} {topic} {num(1, 99)}",
            pick(_STAGES) if state == 0 else "close",
            state,
            self.money(1_000, 2_000_000) if rand() < 0.9 else None,
            pick((10, 20, 40, 60, 80)) if state == 0 else 100 if state == 1 else 0,
            close,
            close - timedelta(days=num(0, 30)) if state else None,
        )

    def activity(self, anchor: datetime) -> tuple[Any, ...]:
        rand, pick, num = self.rand, self.pick, self.between_int
        roll = rand()
        kind = (
            "email" if roll < 0.35
            else "phonecall" if roll < 0.65
            else "appointment" if roll < 0.8
            else "task"
        )  # fmt: skip
        if kind == "email":
            # One e-mail in ten is a long thread: large enough to be TOASTed even compressed.
            body: str | None = self.text(num(8_000, 20_000) if rand() < 0.1 else 300)
        elif kind == "task" and rand() < 0.5:
            body = None
        else:
            body = self.text(num(40, 400))
        start = anchor + timedelta(minutes=15 * num(0, 4 * 24 * 30))
        roll = rand()
        return (
            kind,
            f"{kind.capitalize()}: {pick(self._subjects)}",
            body,
            0 if roll < 0.2 else 1 if roll < 0.8 else 2,
            pick((15, 30, 45, 60, 90, 120)) if kind in ("phonecall", "appointment") else None,
            num(10_000, 30_000_000_000) if rand() < 0.15 else None,
            start if kind != "task" else None,
            # The appointment's wall-clock time at the customer's site, without a zone.
            (start + timedelta(minutes=pick(_CITIES)[3])).replace(tzinfo=None)
            if kind == "appointment"
            else None,
            rand() < 0.6,
        )

    def record(self, table: str, anchor: datetime, key: Any = None) -> tuple[Any, ...]:
        """Fresh business values for a row of a record table (see ``_FIELDS``)."""
        if table == "accounts":
            return self.account(key)
        if table == "contacts":
            return self.contact()
        if table == "opportunities":
            return self.opportunity(anchor)
        return self.activity(anchor)


# --- fill ---------------------------------------------------------------------------------------


def _record_columns(table: str, *, with_key: bool) -> tuple[str, ...]:
    key = PRIMARY_KEYS[table] if with_key else ()
    return (*key, *_LINKS[table], *_FIELDS[table], *_OWNER, *_STAMPS)


@dataclass(frozen=True, slots=True)
class _Owner:
    user_id: uuid.UUID
    team_id: uuid.UUID | None


class _Filler:
    """One fill run: the seeded values and the ids written so far, which children refer to."""

    def __init__(self, cur: psycopg.Cursor[Any], rng: random.Random) -> None:
        self.cur = cur
        self.rng = rng
        self.synth = _Synth(rng)
        self.users: list[uuid.UUID] = []
        self.user_teams: list[list[uuid.UUID]] = []
        self.teams: list[uuid.UUID] = []
        self.team_members = 0
        self.accounts: list[tuple[uuid.UUID, datetime, _Owner]] = []
        self.contacts_of: list[list[int]] = []
        self.opportunities: list[tuple[uuid.UUID, int, datetime]] = []

    @contextmanager
    def copy(self, table: str, columns: Sequence[str]) -> Iterator[psycopg.Copy]:
        """A binary COPY into ``table``: several times cheaper to format than text."""
        types = dict(
            self.cur.execute(
                "SELECT attname, atttypid FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (f"{SCHEMA}.{table}",),
            ).fetchall()
        )
        sql = f"COPY {SCHEMA}.{table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        with self.cur.copy(sql, writer=QueuedLibpqWriter(self.cur)) as copy:
            copy.set_types([types[column] for column in columns])
            yield copy

    def stamps(self, start: datetime) -> tuple[datetime, datetime]:
        """Created after ``start``, modified after that, both before the end of history."""
        rand = self.synth.rand
        created_s = int(rand() * (_HISTORY_END - start).total_seconds())
        modified_s = created_s + int(rand() * ((_HISTORY_END - start).total_seconds() - created_s))
        return start + timedelta(seconds=created_s), start + timedelta(seconds=modified_s)

    def owner(self) -> _Owner:
        """A random user, and one of that user's teams half of the time."""
        i = int(self.synth.rand() * len(self.users))
        teams = self.user_teams[i]
        team = self.synth.pick(teams) if teams and self.synth.rand() < 0.5 else None
        return _Owner(self.users[i], team)

    def child_owner(self, account_owner: _Owner) -> _Owner:
        """Usually the account's owner, as when records are created from the account form."""
        return account_owner if self.synth.rand() < 0.8 else self.owner()

    def write_organisation(self, n_units: int, n_teams: int, n_users: int) -> None:
        r, s = self.rng, self.synth
        org_end = _HISTORY_START + timedelta(days=60)
        units = [s.new_id() for _ in range(n_units)]
        columns: tuple[str, ...] = ("business_unit_id", "parent_business_unit_id", "name")
        columns += ("cost_center",)
        with self.copy("business_units", (*columns, *_STAMPS)) as copy:
            for i, unit in enumerate(units):
                parent = units[r.randrange(i)] if i else None
                name = _BUSINESS_UNITS[i % len(_BUSINESS_UNITS)]
                name = name if i < len(_BUSINESS_UNITS) else f"{name} {i // len(_BUSINESS_UNITS)}"
                cost_center = f"CC-{r.randrange(10_000):04d}" if r.random() < 0.8 else None
                created = s.between(_HISTORY_START, org_end)
                copy.write_row((unit, parent, name, cost_center, created, created))

        columns = ("team_id", "business_unit_id", "name", "team_type", "email")
        with self.copy("teams", (*columns, *_STAMPS)) as copy:
            for i in range(n_teams):
                team, unit = s.new_id(), r.choice(units)
                name = f"{r.choice(_TEAM_WORDS)} {i + 1}"
                email = f"team{i + 1}@fieldsync.example" if r.random() < 0.6 else None
                created = s.between(_HISTORY_START, org_end)
                copy.write_row((team, unit, name, r.choice((0, 0, 0, 1)), email, created, created))
                self.teams.append(team)

        columns = ("user_id", "business_unit_id", "domain_name", "full_name", "job_title")
        columns += ("mobile_phone", "is_disabled")
        with self.copy("users", (*columns, *_STAMPS)) as copy:
            for i in range(n_users):
                user, (first, last) = s.new_id(), s.person()
                domain = f"{first}.{last}.{i + 1}@fieldsync.example".lower().replace("'", "")
                phone = f"+49 151 {r.randrange(10**8):08d}" if r.random() < 0.7 else None
                title = r.choice(("Field Technician", "Sales Rep", "Service Manager", None))
                created, modified = self.stamps(_HISTORY_START)
                disabled = r.random() < 0.03
                row = (user, r.choice(units), domain, f"{first} {last}", title, phone, disabled)
                copy.write_row((*row, created, modified))
                self.users.append(user)

        with self.copy("team_members", ("team_id", "user_id", "joined_on")) as copy:
            for user in self.users:
                picked = r.sample(range(n_teams), r.randint(1, min(3, n_teams)))
                self.user_teams.append([self.teams[t] for t in sorted(picked)])
                for t in sorted(picked):
                    joined = s.between(_HISTORY_START, _HISTORY_END).date()
                    copy.write_row((self.teams[t], user, joined))
                    self.team_members += 1

    def write_accounts(self, n: int) -> None:
        columns = _record_columns("accounts", with_key=True)
        start = _HISTORY_START + timedelta(days=60)
        with self.copy("accounts", columns) as copy:
            for _ in range(n):
                account_id, owner = self.synth.new_id(), self.owner()
                created, modified = self.stamps(start)
                values = self.synth.account(account_id)
                copy.write_row(
                    (account_id, *values, owner.user_id, owner.team_id, created, modified)
                )
                self.accounts.append((account_id, created, owner))
                self.contacts_of.append([])

    def write_contacts(self, n: int) -> None:
        columns = _record_columns("contacts", with_key=True)
        with self.copy("contacts", columns) as copy:
            for contact_id in range(1, n + 1):
                a = self.synth.index(len(self.accounts))
                account_id, account_created, account_owner = self.accounts[a]
                owner = self.child_owner(account_owner)
                created, modified = self.stamps(account_created)
                row = (contact_id, account_id, *self.synth.contact(), owner.user_id, owner.team_id)
                copy.write_row((*row, created, modified))
                self.contacts_of[a].append(contact_id)

    def write_opportunities(self, n: int) -> None:
        columns = _record_columns("opportunities", with_key=True)
        with self.copy("opportunities", columns) as copy:
            for _ in range(n):
                a = self.synth.index(len(self.accounts))
                account_id, account_created, account_owner = self.accounts[a]
                contacts = self.contacts_of[a]
                contact = (
                    self.synth.pick(contacts) if contacts and self.synth.rand() < 0.7 else None
                )
                opportunity_id, owner = self.synth.new_id(), self.child_owner(account_owner)
                created, modified = self.stamps(account_created)
                values = self.synth.opportunity(created)
                row = (opportunity_id, account_id, contact, *values, owner.user_id, owner.team_id)
                copy.write_row((*row, created, modified))
                self.opportunities.append((opportunity_id, a, created))

    def write_activities(self, n: int) -> None:
        columns = _record_columns("activities", with_key=True)
        with self.copy("activities", columns) as copy:
            for activity_id in range(1, n + 1):
                opportunity_id: uuid.UUID | None = None
                if self.opportunities and self.synth.rand() < 0.55:
                    opportunity_id, a, start = self.synth.pick(self.opportunities)
                else:
                    a = self.synth.index(len(self.accounts))
                    start = self.accounts[a][1]
                account_id, _, account_owner = self.accounts[a]
                owner = self.child_owner(account_owner)
                created, modified = self.stamps(start)
                values = self.synth.activity(created)
                row = (activity_id, account_id, opportunity_id, *values)
                copy.write_row((*row, owner.user_id, owner.team_id, created, modified))


def _drop_foreign_keys_and_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop the source's foreign keys and secondary indexes; return the DDL restoring them.

    Loading without per-row foreign-key triggers and index updates, then building each index
    and checking each key in one pass, is several times faster (PostgreSQL's own advice in
    "Populating a Database"). It all happens in fill's transaction: no one else ever sees the
    tables without them, and data that broke a key would fail the fill.
    """
    indexes = conn.execute(
        """
        SELECT pg_get_indexdef(i.indexrelid), i.indexrelid::regclass::text
        FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relnamespace = %s::regnamespace
          AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid
                          AND c.contype IN ('p', 'u', 'x'))
        ORDER BY 2
        """,
        (SCHEMA,),
    ).fetchall()
    keys = conn.execute(
        """
        SELECT conrelid::regclass::text, quote_ident(conname), pg_get_constraintdef(oid)
        FROM pg_constraint WHERE contype = 'f' AND connamespace = %s::regnamespace
        ORDER BY 1, 2
        """,
        (SCHEMA,),
    ).fetchall()
    for table, name, _ in keys:
        conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    for _, index in indexes:
        conn.execute(f"DROP INDEX {index}")
    return [ddl for ddl, _ in indexes] + [
        f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"
        for table, name, definition in keys
    ]


def scale(accounts: int) -> dict[str, int]:
    """How many organisation rows go with ``accounts``: a user per 50 accounts, and so on."""
    users = max(5, accounts // 50)
    return {
        "business_units": max(2, min(len(_BUSINESS_UNITS) * 3, 1 + users // 40)),
        "teams": max(3, users // 10),
        "users": users,
        "contacts": 3 * accounts,
        "opportunities": 2 * accounts,
        "activities": 4 * accounts,
    }


def fill(dsn: str, *, accounts: int, seed: int = 0) -> SampleCounts:
    """Create the source if needed and fill its empty tables in one transaction.

    The scale is driven by ``accounts``: 3 contacts, 2 opportunities and 4 activities per
    account on average (spread unevenly, as in a real CRM), a user per 50 accounts (at least
    5), a team per 10 users. The same seed always writes exactly the same rows.
    """
    if accounts < 0:
        raise ValueError(f"accounts must be >= 0, got {accounts}")
    create_source(dsn)
    sizes = scale(accounts)
    with psycopg.connect(dsn) as conn:
        conn.execute(f"LOCK TABLE {', '.join(f'{SCHEMA}.{t}' for t in TABLES)}")
        for table in TABLES:
            if conn.execute(f"SELECT EXISTS (SELECT FROM {SCHEMA}.{table})").fetchone() != (False,):
                raise SampleSourceError(
                    f"{SCHEMA}.{table} already has rows; fill needs an empty sample source",
                    code="sample_not_empty",
                )
        restore = _drop_foreign_keys_and_indexes(conn)
        with conn.cursor() as cur:
            filler = _Filler(cur, random.Random(seed))  # noqa: S311 - reproducible, not secret
            filler.write_organisation(sizes["business_units"], sizes["teams"], sizes["users"])
            if accounts:
                filler.write_accounts(accounts)
                filler.write_contacts(sizes["contacts"])
                filler.write_opportunities(sizes["opportunities"])
                filler.write_activities(sizes["activities"])
            # Rows were copied with explicit identity values; later inserts continue after them.
            for table, column, last in (
                ("contacts", "contact_id", sizes["contacts"]),
                ("activities", "activity_id", sizes["activities"]),
            ):
                cur.execute(
                    "SELECT setval(pg_get_serial_sequence(%s, %s), %s, %s)",
                    (f"{SCHEMA}.{table}", column, max(last, 1), last > 0),
                )
        for ddl in restore:  # builds each index and checks each foreign key in one pass
            conn.execute(ddl)
        conn.commit()
        # Fresh statistics, so that churn's lookups by parent use the indexes right away.
        conn.execute(f"ANALYZE {', '.join(f'{SCHEMA}.{t}' for t in TABLES)}")
    return SampleCounts(
        business_units=sizes["business_units"],
        teams=sizes["teams"],
        users=sizes["users"],
        team_members=filler.team_members,
        accounts=accounts,
        contacts=sizes["contacts"],
        opportunities=sizes["opportunities"],
        activities=sizes["activities"],
    )


# --- churn --------------------------------------------------------------------------------------


class _Pool(Generic[T]):
    """The ids of a table that exist now: add, remove and pick uniformly, each in O(1)."""

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._items: list[T] = list(items)
        self._index: dict[T, int] = {item: i for i, item in enumerate(self._items)}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def add(self, item: T) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        i = self._index.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def pick(self, rng: random.Random) -> T:
        return self._items[rng.randrange(len(self._items))]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ChangeGenerator:
    """Makes one realistic change at a time on an open connection, tracking which rows exist.

    It loads the ids of every record, user, team and membership once, then keeps that picture
    current from its own inserts and deletes (``RETURNING``), so it only updates and deletes
    rows that exist and never violates a foreign key: children are deleted before parents.
    It assumes it is the only writer of the sample records. Statements run in the
    connection's current transaction; committing is the caller's choice. The same seed on the
    same starting data gives the same sequence of changes.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        seed: int = 0,
        mix: ChangeMix | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._conn = conn
        self._rng = random.Random(seed)  # noqa: S311 - reproducible, not secret
        self._synth = _Synth(self._rng)
        self._clock = clock
        weights = (mix or ChangeMix()).weights()
        self._kinds = list(weights)
        self._kind_weights = list(weights.values())
        self.by_kind: Counter[str] = Counter()
        self.row_ops: Counter[tuple[str, str]] = Counter()

        def ids(sql: str) -> list[Any]:
            return [row[0] for row in conn.execute(sql)]

        self._users: list[uuid.UUID] = ids(f"SELECT user_id FROM {SCHEMA}.users ORDER BY 1")
        if not self._users:
            raise SampleSourceError(
                "the sample source has no users; run fill first", code="sample_not_filled"
            )
        self._teams: list[uuid.UUID] = ids(f"SELECT team_id FROM {SCHEMA}.teams ORDER BY 1")
        members = conn.execute(
            f"SELECT team_id, user_id FROM {SCHEMA}.team_members ORDER BY 1, 2"
        ).fetchall()
        self._memberships: _Pool[tuple[uuid.UUID, uuid.UUID]] = _Pool(members)
        self._user_teams: dict[uuid.UUID, list[uuid.UUID]] = {user: [] for user in self._users}
        for team, user in members:
            self._user_teams[user].append(team)
        self._pools: dict[str, _Pool[Any]] = {
            table: _Pool(ids(f"SELECT {PRIMARY_KEYS[table][0]} FROM {SCHEMA}.{table} ORDER BY 1"))
            for table in RECORD_TABLES
        }

    def row_count(self, table: str) -> int:
        """How many rows of a record table exist, as far as this generator knows."""
        return len(self._pools[table])

    def step(self) -> Change:
        """Make one change (possibly several statements) in the current transaction."""
        kind = self._rng.choices(self._kinds, weights=self._kind_weights)[0]
        if kind == "membership":
            change = self._membership()
        else:
            weights = _TABLE_WEIGHTS[kind]
            table = self._rng.choices(list(weights), weights=list(weights.values()))[0]
            handlers: dict[str, Callable[[str], Change]] = {
                "insert": self._insert,
                "update": self._update,
                "delete": self._delete,
                "reassign": self._reassign,
                "team": self._team,
            }
            change = handlers[kind](table)
        self.by_kind[change.kind] += 1
        return change

    # helpers

    def _execute(self, table: str, op: str, sql: str, params: Sequence[Any]) -> list[Any]:
        cur = self._conn.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
        self.row_ops[(table, op)] += max(cur.rowcount, 0)
        return rows

    def _owner(self) -> tuple[uuid.UUID, uuid.UUID | None]:
        user = self._rng.choice(self._users)
        teams = self._user_teams[user]
        team = self._rng.choice(teams) if teams and self._rng.random() < 0.5 else None
        return user, team

    def _account_owner(self, account_id: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID | None]:
        row = self._conn.execute(
            f"SELECT owner_id, owning_team_id FROM {SCHEMA}.accounts WHERE account_id = %s",
            (account_id,),
        ).fetchone()
        if row is not None and self._rng.random() < 0.8:
            return row[0], row[1]
        return self._owner()

    def _insert_row(self, table: str, columns: Sequence[str], values: Sequence[Any]) -> Any:
        pk = PRIMARY_KEYS[table][0]
        sql = (
            f"INSERT INTO {SCHEMA}.{table} ({', '.join(columns)})"
            f" VALUES ({', '.join(['%s'] * len(columns))}) RETURNING {pk}"
        )
        key = self._execute(table, "insert", sql, values)[0][0]
        self._pools[table].add(key)
        return key

    def _delete_where(self, table: str, where: str, params: Sequence[Any]) -> None:
        pk = PRIMARY_KEYS[table][0]
        sql = f"DELETE FROM {SCHEMA}.{table} WHERE {where} RETURNING {pk}"
        for (key,) in sorted(self._execute(table, "delete", sql, params)):
            self._pools[table].discard(key)

    # kinds of change

    def _insert(self, table: str) -> Change:
        accounts = self._pools["accounts"]
        if table != "accounts" and not accounts:
            table = "accounts"
        now = self._clock()
        if table == "accounts":
            account_id = self._synth.new_id()
            values: tuple[Any, ...] = (account_id, *self._synth.account(account_id))
            columns: tuple[str, ...] = ("account_id", *_FIELDS[table])
            key = self._insert_row(table, (*columns, *_OWNER), (*values, *self._owner()))
            return Change("insert", table, str(key))

        account_id = accounts.pick(self._rng)
        if table == "contacts":
            links: tuple[Any, ...] = (account_id,)
        elif table == "opportunities":
            contacts = [
                row[0]
                for row in self._conn.execute(
                    f"SELECT contact_id FROM {SCHEMA}.contacts WHERE account_id = %s ORDER BY 1",
                    (account_id,),
                )
            ]
            contact = self._rng.choice(contacts) if contacts and self._rng.random() < 0.7 else None
            links = (self._synth.new_id(), account_id, contact)
        else:  # activities: about an opportunity (and its account) or about an account only
            opportunities = self._pools["opportunities"]
            opportunity_id = None
            if opportunities and self._rng.random() < 0.55:
                opportunity_id = opportunities.pick(self._rng)
                row = self._conn.execute(
                    f"SELECT account_id FROM {SCHEMA}.opportunities WHERE opportunity_id = %s",
                    (opportunity_id,),
                ).fetchone()
                if row is None:
                    raise SampleSourceError(
                        f"opportunity {opportunity_id} vanished: churn must be the only writer",
                        code="sample_changed_underneath",
                    )
                account_id = row[0]
            links = (account_id, opportunity_id)
        key_columns = ("opportunity_id",) if table == "opportunities" else ()
        columns = (*key_columns, *_LINKS[table], *_FIELDS[table], *_OWNER)
        values = (*links, *self._synth.record(table, now), *self._account_owner(account_id))
        key = self._insert_row(table, columns, values)
        return Change("insert", table, str(key))

    def _update(self, table: str) -> Change:
        pool = self._pools[table]
        if not pool:
            return self._insert(table)
        key = pool.pick(self._rng)
        groups = _UPDATE_GROUPS[table]
        chosen = self._rng.sample(groups, 2 if self._rng.random() < 0.2 else 1)
        fresh = dict(
            zip(_FIELDS[table], self._synth.record(table, self._clock(), key), strict=True)
        )
        columns = [column for group in chosen for column in group]
        assignments = [f"{column} = %s" for column in columns]
        if table == "accounts":
            assignments.append("version_number = version_number + 1")
        pk = PRIMARY_KEYS[table][0]
        sql = (
            f"UPDATE {SCHEMA}.{table} SET {', '.join(assignments)}, modified_on = now()"
            f" WHERE {pk} = %s"
        )
        self._execute(table, "update", sql, [*(fresh[c] for c in columns), key])
        return Change("update", table, str(key))

    def _delete(self, table: str) -> Change:
        pool = self._pools[table]
        if not pool:
            return self._insert(table)
        key = pool.pick(self._rng)
        if table == "accounts":
            self._delete_where(
                "activities",
                "regarding_account_id = %s OR regarding_opportunity_id IN"
                f" (SELECT opportunity_id FROM {SCHEMA}.opportunities WHERE account_id = %s)",
                (key, key),
            )
            self._delete_where("opportunities", "account_id = %s", (key,))
            self._delete_where("contacts", "account_id = %s", (key,))
        elif table == "opportunities":
            self._delete_where("activities", "regarding_opportunity_id = %s", (key,))
        elif table == "contacts":  # as the CRM does: the opportunity loses its contact
            self._execute(
                "opportunities",
                "update",
                f"UPDATE {SCHEMA}.opportunities SET contact_id = NULL, modified_on = now()"
                " WHERE contact_id = %s",
                (key,),
            )
        self._delete_where(table, f"{PRIMARY_KEYS[table][0]} = %s", (key,))
        return Change("delete", table, str(key))

    def _reassign(self, table: str) -> Change:
        pool = self._pools[table]
        if not pool:
            return self._insert(table)
        key = pool.pick(self._rng)
        pk = PRIMARY_KEYS[table][0]
        sql = (
            f"UPDATE {SCHEMA}.{table} SET owner_id = %s, owning_team_id = %s,"
            f" modified_on = now() WHERE {pk} = %s"
        )
        self._execute(table, "update", sql, (*self._owner(), key))
        return Change("reassign", table, str(key))

    def _team(self, table: str) -> Change:
        pool = self._pools[table]
        if not pool or not self._teams:
            return self._insert(table)
        key = pool.pick(self._rng)
        team = self._rng.choice(self._teams) if self._rng.random() < 0.8 else None
        pk = PRIMARY_KEYS[table][0]
        sql = (
            f"UPDATE {SCHEMA}.{table} SET owning_team_id = %s, modified_on = now() WHERE {pk} = %s"
        )
        self._execute(table, "update", sql, (team, key))
        return Change("team", table, str(key))

    def _membership(self) -> Change:
        """Add a user to a team they are not in, or take one out: as often one as the other."""
        if not self._teams:
            return self._insert("activities")
        memberships = self._memberships
        remove = bool(memberships) and self._rng.random() < 0.5
        if not remove:
            for _ in range(10):
                team, user = self._rng.choice(self._teams), self._rng.choice(self._users)
                if (team, user) not in memberships:
                    break
            else:  # (nearly) everyone is in every team
                remove = True
        if remove:
            team, user = memberships.pick(self._rng)
            self._execute(
                "team_members",
                "delete",
                f"DELETE FROM {SCHEMA}.team_members WHERE team_id = %s AND user_id = %s",
                (team, user),
            )
            memberships.discard((team, user))
            self._user_teams[user].remove(team)
        else:
            self._execute(
                "team_members",
                "insert",
                f"INSERT INTO {SCHEMA}.team_members (team_id, user_id) VALUES (%s, %s)",
                (team, user),
            )
            memberships.add((team, user))
            self._user_teams[user].append(team)
        return Change("membership", "team_members", f"{team}/{user}")


def churn(
    dsn: str,
    *,
    rate_per_s: float,
    duration_s: float | None = None,
    max_changes: int | None = None,
    seed: int = 0,
    mix: ChangeMix | None = None,
    changes_per_tx: int = 1,
    stop: threading.Event | None = None,
) -> ChurnStats:
    """Change the sample source at ``rate_per_s`` changes per second until a limit is reached.

    Change *i* is due ``i / rate_per_s`` seconds after the start; the generator sleeps until a
    change is due, and when it falls behind it runs back-to-back and reports the rate it
    achieved (``math.inf`` means as fast as possible). Every ``changes_per_tx`` changes are
    one transaction. It stops after ``duration_s``, after ``max_changes``, or when ``stop`` is
    set, whichever comes first; with none of them it runs until interrupted.
    """
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    if changes_per_tx < 1:
        raise ValueError(f"changes_per_tx must be >= 1, got {changes_per_tx}")
    stop = stop or threading.Event()
    with psycopg.connect(dsn) as conn:
        generator = ChangeGenerator(conn, seed=seed, mix=mix)
        conn.commit()  # do not keep the loading snapshot open while pacing
        start = time.monotonic()
        deadline = start + duration_s if duration_s is not None else math.inf
        done = transactions = 0
        max_lag = 0.0
        while (max_changes is None or done < max_changes) and not stop.is_set():
            due = start + done / rate_per_s
            now = time.monotonic()
            if due >= deadline or now >= deadline:  # a duration is a duration, even when behind
                stop.wait(max(0.0, deadline - now))
                break
            delay = due - now
            if delay > 0:
                if stop.wait(delay):
                    break
            else:
                max_lag = max(max_lag, -delay)
            batch = changes_per_tx
            if max_changes is not None:
                batch = min(batch, max_changes - done)
            for _ in range(batch):
                generator.step()
            conn.commit()
            done += batch
            transactions += 1
        elapsed = time.monotonic() - start
    by_table: dict[str, dict[str, int]] = {}
    for (table, op), count in sorted(generator.row_ops.items()):
        by_table.setdefault(table, dict.fromkeys(ROW_OPS, 0))[op] += count
    return ChurnStats(
        changes=done,
        transactions=transactions,
        elapsed_s=elapsed,
        target_rate=rate_per_s,
        max_lag_s=max_lag,
        by_kind={kind: generator.by_kind[kind] for kind in CHANGE_KINDS},
        by_table=by_table,
    )
