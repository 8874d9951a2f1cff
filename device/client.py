"""The reference device client: keeps a local SQLite copy of one user's offline view.

``DeviceClient.sync()`` does what a mobile app does on each sync:

1. download the client model (``/metadata``) and create or alter local tables from it;
2. ``POST /sync`` with the token of every entity; apply each delta page in one transaction,
   following ``has_more``; an entity answered with ``must_bootstrap`` is bootstrapped
   (``/bootstrap/<entity>``, resumed from the last stored cursor after a cut connection), an
   entity ``removed`` from the profile is dropped;
3. repeat until every entity is up to date.

``watch()`` keeps syncing with long-polls (``wait``), so changes arrive as they happen.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from device.store import LocalStore, parse_row

log = logging.getLogger("fieldsync.device")


class SyncFailed(Exception):
    """The gateway refused the sync (status and its message)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class SyncReport:
    upserts: int = 0
    removes: int = 0
    bootstrapped: list[str] = field(default_factory=list)
    bootstrap_rows: int = 0
    dropped: list[str] = field(default_factory=list)
    requests: int = 0


class DeviceClient:
    def __init__(
        self,
        base_url: str,
        org: str,
        token: str | Callable[[], str],
        database: Path | str,
        *,
        http: httpx.Client | None = None,
        page_rows: int | None = None,
        gzip: bool = True,
        verify: bool | str = True,  # a path: trust this CA bundle
    ) -> None:
        self.base = base_url.rstrip("/") + f"/orgs/{org}"
        self._token = token
        self.store = LocalStore(database)
        trust = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self.http = http or httpx.Client(timeout=httpx.Timeout(30.0, read=120.0), verify=trust)
        self.page_rows = page_rows
        self.gzip = gzip

    def close(self) -> None:
        self.store.close()
        self.http.close()

    def _headers(self) -> dict[str, str]:
        token = self._token() if callable(self._token) else self._token
        headers = {"authorization": f"Bearer {token}"}
        if not self.gzip:
            headers["accept-encoding"] = "identity"
        return headers

    def _check(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise SyncFailed(response.status_code, str(detail))

    def _retrying(self, send: Callable[[], httpx.Response], attempts: int = 5) -> httpx.Response:
        """Resend after a dropped connection: a sync page is a pure function of its tokens,
        so asking again with the same tokens is safe and returns the same page."""
        for attempt in range(attempts):
            try:
                return send()
            except httpx.TransportError as error:
                if attempt == attempts - 1:
                    raise
                log.info("request failed (%s); retrying", error)
                time.sleep(min(0.1 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    # -- the protocol -------------------------------------------------------------------------
    def refresh_metadata(self) -> dict[str, Any]:
        response = self._retrying(
            lambda: self.http.get(f"{self.base}/metadata", headers=self._headers())
        )
        self._check(response)
        metadata: dict[str, Any] = response.json()
        self.store.apply_metadata(metadata)
        return metadata

    def sync(self, *, wait: float = 0, max_rounds: int = 10_000) -> SyncReport:
        """Bring the local database up to date (``wait``: long-poll when nothing changed)."""
        report = SyncReport()
        self.refresh_metadata()
        for _ in range(max_rounds):
            body: dict[str, Any] = {"tokens": self.store.tokens(), "wait": wait}
            if self.page_rows:
                body["limit"] = self.page_rows
            response = self._retrying(
                lambda body=body: self.http.post(  # type: ignore[misc]
                    f"{self.base}/sync", json=body, headers=self._headers()
                )
            )
            report.requests += 1
            self._check(response)
            again = False
            for result in parse_row(response.content)["entities"]:
                entity = result["entity"]
                if result["control"] == "removed":
                    self.store.drop_entity(entity)
                    report.dropped.append(entity)
                    continue
                if result["control"] == "must_bootstrap":
                    if entity not in self.store.models():  # profile gained it
                        self.refresh_metadata()
                    report.bootstrap_rows += self.bootstrap(entity)
                    report.bootstrapped.append(entity)
                    again = True
                    continue
                upserts, removes = result["upserts"], result["removes"]
                self.store.apply_delta(
                    entity, upserts, removes, result["token"], result["watermark"]
                )
                report.upserts += len(upserts)
                report.removes += len(removes)
                again = again or result["has_more"]
            if not again:
                return report
            wait = 0
        raise SyncFailed(0, f"not up to date after {max_rounds} rounds")

    def bootstrap(self, entity: str, *, retries: int = 20) -> int:
        """Load ``entity`` from its snapshot; resumes from the stored cursor after a failure."""
        if self.store.cursor(entity) is None:
            self.store.begin_bootstrap(entity)
        rows = 0
        for attempt in range(retries):
            try:
                return rows + self._bootstrap_stream(entity)
            except (httpx.TransportError, _Restart) as error:
                log.info("bootstrap of %s interrupted (%s); resuming", entity, error)
                time.sleep(min(0.1 * 2**attempt, 2.0))
        raise SyncFailed(0, f"bootstrap of {entity} failed {retries} times")

    def _bootstrap_stream(self, entity: str) -> int:
        cursor = self.store.cursor(entity)
        params = {"cursor": cursor} if cursor else {}
        rows: list[dict[str, Any]] = []
        count = 0
        with self.http.stream(
            "GET", f"{self.base}/bootstrap/{entity}", params=params, headers=self._headers()
        ) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            header: dict[str, Any] | None = None
            for line in response.iter_lines():
                if not line:
                    continue
                if line.startswith('{"$'):
                    control = parse_row(line)
                    if "$must_bootstrap" in control:  # the cursor is stale: start over
                        self.store.begin_bootstrap(entity)
                        raise _Restart(control["$must_bootstrap"])
                    if "$entity" in control:
                        header = control
                    elif "$cursor" in control:
                        self.store.add_bootstrap_page(entity, rows, control["$cursor"])
                        count += len(rows)
                        rows = []
                    elif "$done" in control:
                        assert header is not None
                        self.store.finish_bootstrap(
                            entity, rows, control["token"], header["watermark"]
                        )
                        return count + len(rows)
                    continue
                rows.append(parse_row(line))
        raise httpx.RemoteProtocolError("bootstrap stream ended before $done")

    def watch(self, *, wait: float = 30, rounds: int | None = None) -> None:
        """Sync forever (or ``rounds`` times), long-polling between changes."""
        done = 0
        while rounds is None or done < rounds:
            report = self.sync(wait=wait)
            log.info(
                "synced: %d upserts, %d removals, bootstrapped %s",
                report.upserts,
                report.removes,
                report.bootstrapped,
            )
            done += 1


class _Restart(Exception):
    """The server no longer serves the stored bootstrap cursor: start the entity over."""


__all__ = ["DeviceClient", "SyncFailed", "SyncReport"]
