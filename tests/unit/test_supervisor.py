"""The supervisor's pure parts: the run's credentials, the restart policy's arithmetic, what it writes down, and the
command lines of an expert-parallel replica's processes."""

from __future__ import annotations

import pytest

from moemesh.supervisor import Child, Mesh, MeshOptions, MeshSecrets, RestartPolicy, describe_exit, redact_url


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


# ---- moemesh up --ep-size N: a replica as N processes ----------------------------------------------------------------
def ep_mesh(tmp_path, **options) -> tuple[Mesh, Child]:
    mesh = Mesh(MeshOptions(model_dir=tmp_path, ep_size=2, **options),
                credentials=MeshSecrets("t" * 20, "k" * 20))
    scheduler = Child("scheduler", lambda: [])
    scheduler.bound["address"] = "127.0.0.1:7000"
    return mesh, scheduler


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_a_shard_registers_as_its_rank_of_its_replica_and_gets_the_token_by_environment_only(tmp_path):
    mesh, scheduler = ep_mesh(tmp_path, ep_placement="0,1,1,1")
    shard = mesh._shard_child(0, 1, "replica-0", scheduler)
    argv = shard.argv()
    assert argv[2] == "moemesh.worker.server.shard"
    assert [flag(argv, f) for f in ("--rank", "--world-size", "--replica-group", "--scheduler", "--placement")] == \
        ["1", "2", "replica-0", "127.0.0.1:7000", "0,1,1,1"]
    assert shard.env == {"MOEMESH_SHARD_CLUSTER_TOKEN": "t" * 20} and "t" * 20 not in " ".join(argv)


def test_a_restarted_shard_binds_the_port_it_first_had_so_rank_0_finds_it_again(tmp_path):
    mesh, scheduler = ep_mesh(tmp_path)
    shard = mesh._shard_child(0, 1, "replica-0", scheduler)
    assert flag(shard.argv(), "--port") == "0", "first start: any free port"
    shard.bound["address"] = "127.0.0.1:7123"
    assert flag(shard.argv(), "--port") == "7123"


def test_rank_0_gets_its_shards_addresses_in_rank_order_and_its_group(tmp_path):
    mesh, scheduler = ep_mesh(tmp_path, ep_placement="0,1,1,1")
    shards = [mesh._shard_child(0, rank, "replica-0", scheduler) for rank in (1, 2)]
    for rank, shard in enumerate(shards, start=1):
        shard.bound["address"] = f"127.0.0.1:{7100 + rank}"
    argv = mesh._worker_argv("127.0.0.1:7000", "replica-0", shards)
    assert flag(argv, "--ep-shards") == "127.0.0.1:7101,127.0.0.1:7102"
    assert (flag(argv, "--replica-group"), flag(argv, "--ep-placement")) == ("replica-0", "0,1,1,1")


def test_without_ep_size_a_worker_is_started_exactly_as_before(tmp_path):
    mesh = Mesh(MeshOptions(model_dir=tmp_path), credentials=MeshSecrets("t" * 20, "k" * 20))
    argv = mesh._worker_argv("127.0.0.1:7000")
    assert not {"--ep-shards", "--replica-group", "--ep-placement"} & set(argv)
    assert "shards" not in mesh.ready()


def test_a_placement_without_shards_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="^ep_placement: needs ep_size > 1"):
        MeshOptions(model_dir=tmp_path, ep_placement="0,0,1,1")
