"""Quota enforcement (core/quotas.py) and the quota settings (core/quota_config.py): each limit refuses with
Overloaded naming it and a retry-after, changes nothing when it refuses, and is released as requests move on;
token buckets refill on the clock and go into debt; reloads keep usage; settings are validated."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplex.server.core.errors import Overloaded
from loraplex.server.core.quota_config import QuotaSettings, read_quota_file
from loraplex.server.core.quotas import QuotaBook


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def book(clock: Clock | None = None, **quotas) -> QuotaBook:
    return QuotaBook(QuotaSettings.model_validate(quotas), clock or Clock())


def refused(quota_book: QuotaBook, tenant: str, adapter: str = "", prompt_tokens: int = 1) -> Overloaded:
    with pytest.raises(Overloaded) as error:
        quota_book.accept(tenant, adapter, prompt_tokens)
    return error.value


def test_max_concurrent_refuses_the_next_request_until_one_ends():
    quotas = book(tenants={"team-a": {"max_concurrent": 2}})
    quotas.accept("team-a", "x", 5)
    quotas.accept("team-a", "x", 5)
    error = refused(quotas, "team-a", "x")
    assert str(error).startswith("tenant 'team-a' is over its max_concurrent of 2")
    assert (error.limit, error.retry_after_s) == ("max_concurrent", 1)
    quotas.accept("someone-else", "x", 5)  # other tenants are not affected
    quotas.admitted("team-a", "x", 5)
    quotas.ended("team-a", "x", waiting=False)
    quotas.accept("team-a", "x", 5)
    assert quotas.tenant_status("team-a").in_flight == 2


def test_max_queued_counts_only_waiting_requests():
    quotas = book(default={"max_queued": 1})
    quotas.accept("t", "", 3)
    assert refused(quotas, "t").limit == "max_queued"
    quotas.admitted("t", "", 3)
    quotas.accept("t", "", 3)  # the first one runs: the queue has room again
    quotas.requeued("t", "")  # preempted back into the queue
    assert quotas.tenant_status("t").queued == 2
    assert refused(quotas, "t").limit == "max_queued"


def test_a_refusal_counts_nothing():
    quotas = book(tenants={"t": {"max_concurrent": 1}}, adapters={"x": {"tokens_per_minute": 60}})
    quotas.accept("t", "y", 1)
    refused(quotas, "t", "x", 30)  # t is at its max_concurrent: x's bucket keeps its 60 tokens
    tenants, adapters = quotas.statuses()
    assert [(s.name, s.in_flight) for s in tenants] == [("t", 1)]
    assert {s.name: (s.in_flight, s.bucket_tokens) for s in adapters} == {"x": (0, 60.0), "y": (1, None)}


def test_the_token_bucket_refills_at_the_rate_and_says_when_to_retry():
    clock = Clock()
    quotas = book(clock, tenants={"t": {"tokens_per_minute": 600, "burst_tokens": 100}})  # 10 tokens/s
    quotas.accept("t", "", 80)
    error = refused(quotas, "t", "", 50)  # 20 left, 30 missing: 3 s
    assert (error.limit, error.retry_after_s) == ("tokens_per_minute", 3)
    assert "tenant 't' is over its tokens_per_minute of 600" in str(error)
    clock.now += 3.0
    quotas.accept("t", "", 50)
    quotas.admitted("t", "", 50)
    for _ in range(40):  # generation may go into debt
        quotas.generated("t", "")
    assert quotas.tenant_status("t").bucket_tokens == -40.0
    assert refused(quotas, "t", "", 1).retry_after_s == 5  # 41 tokens at 10/s
    clock.now += 100.0
    quotas.accept("t", "", 1000)  # larger than the bucket: passes once it is full
    assert quotas.tenant_status("t").bucket_tokens == 100.0 - 1000


def test_adapter_limits_apply_over_every_tenant():
    quotas = book(adapters={"": {"max_concurrent": 1}, "hot": {"max_queued": 2}})
    quotas.accept("a", "", 1)
    assert str(refused(quotas, "b", "")).startswith("the base model is over its max_concurrent of 1")
    quotas.accept("a", "hot", 1)
    quotas.accept("b", "hot", 1)
    assert str(refused(quotas, "c", "hot")).startswith("adapter 'hot' is over its max_queued of 2")


def test_replacing_the_limits_keeps_usage_and_bucket_levels():
    clock = Clock()
    quotas = book(clock, tenants={"t": {"max_concurrent": 5, "tokens_per_minute": 1000}})
    quotas.accept("t", "", 900)
    quotas.replace(QuotaSettings.model_validate({"tenants": {"t": {"max_concurrent": 1, "tokens_per_minute": 60}}}))
    status = quotas.tenant_status("t")
    assert (status.in_flight, status.bucket_tokens, status.limits.max_concurrent) == (1, 60.0, 1)  # capped at 60
    assert refused(quotas, "t").limit == "max_concurrent"
    quotas.replace(QuotaSettings())
    quotas.accept("t", "", 10_000)  # no limits any more
    assert quotas.tenant_status("t").bucket_tokens is None


def test_tenants_group_keys_and_others_are_their_own_tenants():
    quotas = QuotaSettings.model_validate({"tenants": {"team-a": {"keys": ["a1", "a2"], "weight": 3},
                                                       "solo": {"priority": "batch"}},
                                           "default": {"max_concurrent": 4}})
    assert [quotas.tenant_of(key) for key in ("a1", "a2", "solo", "other")] == ["team-a", "team-a", "solo", "other"]
    assert quotas.limits_of("team-a").weight == 3 and quotas.limits_of("solo").priority == "batch"
    assert quotas.limits_of("other").max_concurrent == 4
    quotas.check_key_names(["a1", "a2", "x"])
    with pytest.raises(ValueError, match="tenant 'team-a' lists API keys that are not configured: a2"):
        quotas.check_key_names(["a1"])


@pytest.mark.parametrize(("quotas", "problem"), [
    ({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}, "API key 'k' is listed by tenants 'a' and 'b'"),
    ({"tenants": {"a": {"burst_tokens": 5}}}, "burst_tokens needs tokens_per_minute"),
    ({"tenants": {"a": {"weight": 0}}}, "greater than 0"),
    ({"tenants": {"bad/name": {}}}, "tenant name 'bad/name'"),
    ({"tenants": {"a": {"priority": "urgent"}}}, "'interactive' or 'batch'"),
    ({"adapters": {"x": {"max_concurrent": 0}}}, "greater than or equal to 1"),
    ({"tenants": {"a": {"max_running": 3}}}, "Extra inputs are not permitted"),
])
def test_bad_quotas_are_refused_with_what_is_wrong(quotas, problem):
    with pytest.raises(ValidationError, match=problem):
        QuotaSettings.model_validate(quotas)


def test_the_quotas_file_is_read_and_checked(tmp_path: Path):
    path = tmp_path / "quotas.toml"
    path.write_text('port = 1\n[quotas.tenants.team-a]\nmax_concurrent = 2\n[quotas.adapters.""]\nmax_queued = 3\n')
    quotas = read_quota_file(path)
    assert quotas.limits_of("team-a").max_concurrent == 2 and quotas.adapter_limits("").max_queued == 3
    path.write_text("[quotas.tenants.team-a\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        read_quota_file(path)
    path.write_text("[quotas.tenants.team-a]\nmax_concurrent = -1\n")
    with pytest.raises(ValueError, match="max_concurrent"):
        read_quota_file(path)
    with pytest.raises(ValueError, match="cannot read the quotas file"):
        read_quota_file(tmp_path / "missing.toml")
