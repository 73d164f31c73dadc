"""The supervisor's pure parts: the run's credentials, the restart policy's arithmetic, what it writes down."""

from __future__ import annotations

import pytest

from moemesh.supervisor import MeshSecrets, RestartPolicy, describe_exit, redact_url


def test_each_run_makes_its_own_random_cluster_token_and_kv_tier_secret():
    first, second = MeshSecrets.for_this_run({}), MeshSecrets.for_this_run({})
    assert first.cluster_token != second.cluster_token and first.kv_tier_secret != second.kv_tier_secret
    assert len(first.cluster_token) >= 43 and len(first.kv_tier_secret) >= 43, "32 random bytes each"
    assert first.cluster_token != first.kv_tier_secret


def test_credentials_given_to_moemesh_up_are_used_as_they_are():
    given = MeshSecrets.for_this_run({"MOEMESH_CLUSTER_TOKEN": "t" * 20, "MOEMESH_KV_TIER_SECRET": "k" * 20})
    assert (given.cluster_token, given.kv_tier_secret) == ("t" * 20, "k" * 20)
    assert MeshSecrets.for_this_run({"MOEMESH_CLUSTER_TOKEN": ""}).cluster_token, "empty is unset: a fresh one"


@pytest.mark.parametrize("variable", ["MOEMESH_CLUSTER_TOKEN", "MOEMESH_KV_TIER_SECRET"])
def test_a_short_given_credential_is_refused_naming_its_variable(variable):
    with pytest.raises(ValueError, match=f"^{variable}: at least 16 characters"):
        MeshSecrets.for_this_run({variable: "short"})


def test_credentials_never_show_in_a_repr():
    secrets = MeshSecrets.for_this_run({})
    assert secrets.cluster_token not in repr(secrets) and secrets.kv_tier_secret not in repr(secrets)


def test_restart_delays_double_from_half_a_second_to_thirty():
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_a_redis_password_is_redacted_for_the_ready_file():
    assert redact_url("redis://:hunter2@cache:6380/1") == "redis://:***@cache:6380/1"
    assert redact_url("rediss://app:hunter2@cache/0") == "rediss://app:***@cache/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_an_exit_is_described_by_its_code_or_signal():
    assert [describe_exit(c) for c in (1, -9, -15, None)] == ["code 1", "signal SIGKILL", "signal SIGTERM",
                                                            "still running"]
