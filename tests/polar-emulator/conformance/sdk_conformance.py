"""Drives the Polar emulator with Polar's official Python SDK (polar-sdk,
API version 2026-04), whose strict deserializer (adaptix) parses every
response into the SDK's types. Any shape the emulator gets wrong fails here.

usage: sdk_conformance.py BASE_URL TOKEN   (the emulator must allow >= 30 requests/minute)
"""
import datetime as dt
import sys
import traceback
import uuid

from polar.v2026_04 import Polar
from polar import base as polar_base
from polar.v2026_04.errors import HTTPValidationError

BASE, TOKEN = sys.argv[1], sys.argv[2]
polar = Polar(TOKEN, base_url=BASE, timeout=10)
results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append((name, True))
            print(f"ok   {name}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            results.append((name, False))
            print(f"FAIL {name}")
            traceback.print_exc()
        return fn
    return wrap


run = uuid.uuid4().hex[:8]
now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)


@check("ingest parses EventsIngestResponse, duplicates counted")
def _():
    events = [
        {"name": "api.request", "external_customer_id": f"org-{run}", "external_id": f"{run}-{i}",
         "timestamp": now.isoformat(), "metadata": {"i": i, "model": "m", "cached": False, "ratio": 0.5}}
        for i in range(5)
    ]
    r = polar.events.ingest(events=events)
    assert (r.inserted, r.duplicates) == (5, 0), r
    r = polar.events.ingest(events=events[:2])
    assert (r.inserted, r.duplicates) == (0, 2), r


@check("team customer: create, get_external, immutable external_id")
def _():
    c = polar.customers.create(type="team", external_id=f"org-{run}", name="Org", email=f"billing-{run}@example.org")
    assert c.external_id == f"org-{run}" and c.type == "team", c
    g = polar.customers.get_external(external_id=f"org-{run}")
    assert g.id == c.id
    try:
        polar.customers.create(type="team", external_id=f"org-{run}", name="Again", email=f"other-{run}@example.org")
        raise AssertionError("duplicate external_id accepted")
    except polar_base.PolarClientError as e:
        assert e.status_code == 422, e
    try:
        polar.customers.update(id=c.id, external_id=f"changed-{run}")
        raise AssertionError("external_id changed")
    except polar_base.PolarClientError as e:
        assert e.status_code == 422, e


@check("events list parses ListResourceEvent with customer and metadata")
def _():
    page = polar.events.list(external_customer_id=f"org-{run}", source="user", limit=2, sorting=["timestamp"])
    assert page.pagination.total_count == 5 and page.pagination.max_page == 3, page.pagination
    assert len(page.items) == 2
    e = page.items[0]
    assert e.name == "api.request" and e.source == "user" and e.customer is not None
    assert e.customer.external_id == f"org-{run}"
    filtered = polar.events.list(external_customer_id=f"org-{run}", metadata={"i": "3"}, limit=100)
    assert filtered.pagination.total_count == 1, filtered.pagination
    window = polar.events.list(start_timestamp=now.isoformat(), end_timestamp=(now + dt.timedelta(days=1)).isoformat())
    assert window.pagination.total_count == 0, "bounds are exclusive: timestamp > start"


@check("unknown external customer is a parsed 404")
def _():
    try:
        polar.customers.get_external(external_id=f"nobody-{run}")
        raise AssertionError("found a customer that does not exist")
    except polar_base.PolarClientError as e:
        assert e.status_code == 404, e


@check("invalid ingest is a parsed 422 naming the event")
def _():
    try:
        polar.events.ingest(events=[
            {"name": "ok", "external_customer_id": "x"},
            {"name": "bad", "external_customer_id": "x", "metadata": {"nested": {"a": 1}}},
        ])
        raise AssertionError("nested metadata accepted")
    except HTTPValidationError as e:
        # Parsed into the SDK's HTTPValidationError model: loc names event 1.
        locs = [d.loc for d in e.error.detail]
        assert all(loc[:3] == ["body", "events", 1] for loc in locs), locs


@check("a bad token is a parsed 401")
def _():
    other = Polar("polar_oat_not_a_real_token_0000000000000000000000", base_url=BASE, timeout=10)
    try:
        other.events.ingest(events=[])
        raise AssertionError("accepted a bad token")
    except polar_base.PolarClientError as e:
        assert e.status_code == 401, e


@check("the rate limit is a PolarRateLimitError with retry_after")
def _():
    for _ in range(200):
        try:
            polar.events.list(limit=1)
        except polar_base.PolarRateLimitError as e:
            assert e.retry_after and e.retry_after >= 1, e
            return
    raise AssertionError("never rate limited")


passed = sum(ok for _, ok in results)
print(f"{passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
