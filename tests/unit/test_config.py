"""Service settings: merge order (file, secret files, environment, flags), typed values, flags with help, errors
naming the field."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from moemesh.cli import main as cli_main
from moemesh.gateway.config import GatewayConfig
from moemesh.services.core.config import add_flags, flag_values, load_config
from moemesh.services.scheduler.config import SchedulerConfig
from moemesh.worker.server.config import WorkerConfig, device_present
from moemesh.worker.server.shard import ShardConfig
from tests.support.mesh import DEMO_MODEL


def test_flags_override_env_which_overrides_file(tmp_path):
    file = tmp_path / "scheduler.json"
    file.write_text(json.dumps({"port": 1111, "heartbeat_interval": 2.0, "max_missed_heartbeats": 5}))
    env = {"MOEMESH_SCHEDULER_PORT": "2222", "MOEMESH_SCHEDULER_HEARTBEAT_INTERVAL": "0.5"}
    config = load_config(SchedulerConfig, file=file, env=env, flags={"port": 3333, "heartbeat_interval": None})
    assert config.port == 3333, "a flag must win over env and file"
    assert config.heartbeat_interval == 0.5, "env must win over the file when no flag is given"
    assert config.max_missed_heartbeats == 5, "the file must win over defaults"


def test_env_of_another_service_is_ignored():
    config = load_config(SchedulerConfig, env={"MOEMESH_GATEWAY_PORT": "9"})
    assert config.port == 0


@pytest.mark.parametrize(
    ("cls", "values", "field"),
    [
        (SchedulerConfig, {"heartbeat_interval": -1}, "heartbeat_interval"),
        (SchedulerConfig, {"port": 70000}, "port"),
        (GatewayConfig, {"scheduler": "x:1", "max_request_bytes": 10}, "max_request_bytes"),
        (GatewayConfig, {}, "scheduler"),
        (SchedulerConfig, {"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(cls, values, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        load_config(cls, flags=values)


def test_worker_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"model_dir: .*no config.json"):
        load_config(WorkerConfig, flags={"model_dir": str(tmp_path), "scheduler": "127.0.0.1:1"})


@pytest.mark.parametrize("cls", [WorkerConfig, ShardConfig])
def test_a_device_is_cpu_or_cuda_n(cls):
    settings = {"model_dir": str(DEMO_MODEL), "scheduler": "127.0.0.1:1"}
    if cls is ShardConfig:
        settings = {"model_dir": str(DEMO_MODEL), "rank": 1, "world_size": 2}
    for device in ("cpu", "cuda", "cuda:3"):  # a GPU host's configuration loads anywhere: checked at start
        assert load_config(cls, flags={**settings, "device": device}).device == device
    for device in ("tpu", "cuda:", "cuda:x", "CPU", "cuda0"):
        with pytest.raises(ValueError, match=r"\bdevice\b"):
            load_config(cls, flags={**settings, "device": device})


def test_a_device_this_process_cannot_use_is_named_with_the_reason(monkeypatch):
    assert device_present("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^cuda:1: no CUDA device is visible to this process \(PyTorch "):
        device_present("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_present("cuda") == "cuda" and device_present("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match=r"^cuda:1: this process sees 1 CUDA device\(s\), numbered from 0$"):
        device_present("cuda:1")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process that sees no CUDA device")
PLACEMENT_MISFIT = "ep_placement: experts lists 3 ranks, the model has 4 experts"  # the demo model has 4


@pytest.mark.parametrize(("module", "args", "message"), [
    pytest.param("moemesh.worker.server.main", ["--scheduler", "127.0.0.1:1", "--device", "cuda"],
                 "device: cuda: no CUDA device is visible to this process", marks=NO_CUDA),
    pytest.param("moemesh.worker.server.shard", ["--rank", "1", "--world-size", "2", "--device", "cuda"],
                 "device: cuda: no CUDA device is visible to this process", marks=NO_CUDA),
    ("moemesh.worker.server.main", ["--scheduler", "127.0.0.1:1", "--ep-shards", "127.0.0.1:1",
                                    "--ep-placement", "0,0,9"], PLACEMENT_MISFIT),
    ("moemesh.worker.server.shard", ["--rank", "1", "--world-size", "2", "--placement", "0,0,9"], PLACEMENT_MISFIT),
])
def test_a_worker_or_shard_told_what_it_cannot_do_stops_at_start_saying_so(module, args, message):
    """A GPU it cannot see, or a placement that does not fit the model: status 2 and one line, no traceback."""
    started = subprocess.run([sys.executable, "-m", module, "--model-dir", str(DEMO_MODEL), *args],
                             capture_output=True, text=True, timeout=120)
    service = "worker" if module.endswith("main") else "shard"
    assert started.returncode == 2, started.stderr[-2000:]
    assert f"moemesh-{service}: {message}" in started.stderr
    assert "Traceback" not in started.stderr, started.stderr[-2000:]


def test_moemesh_up_refuses_a_device_it_cannot_name_before_starting_anything():
    result = CliRunner().invoke(cli_main, ["up", "--device", "tpu"])
    assert result.exit_code == 2 and "Invalid value for '--device': 'tpu'" in result.output, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--ep-size", "2", "--ep-placement", "0,0,9"], "ep_placement: experts lists 3 ranks, the model has 4 experts"),
    (["--ep-size", "2", "--ep-placement", "0,0,0,0"], "ep_placement: rank(s) [1] would hold no expert in any layer"),
    (["--ep-size", "2", "--ep-placement", "{bad"], "ep_placement: not a placement"),
    (["--ep-size", "2", "--ep-placement", '{"experts": [0, 0, 1, 1], "layers": {"0": [0, 0, 1, 7]}}'],
     "ep_placement: layers.0 has rank(s) [7] outside 0..1"),
    (["--ep-size", "8"], "ep_placement: 8 ranks cannot each hold one of 4 experts"),
])
def test_moemesh_up_refuses_a_placement_that_does_not_fit_the_model_before_starting_anything(monkeypatch, args,
                                                                                              message):
    """The demo model has 4 experts; a map that does not fit it used to start Redis, the scheduler and the gateway,
    then end with a shard's traceback."""
    def started(*_):
        raise AssertionError("the mesh started")

    monkeypatch.setattr("moemesh.cli._run_mesh", started)
    result = CliRunner().invoke(cli_main, ["up", "--no-embeddings", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_moemesh_ray_up_refuses_more_ranks_than_experts_before_joining_a_cluster(monkeypatch):
    def joined(*_, **__):
        raise AssertionError("the mesh was placed on Ray")

    monkeypatch.setattr("moemesh.ray_mesh.serve", joined)
    result = CliRunner().invoke(cli_main, ["ray", "up", "--ep-size", "8", "--no-embeddings"])
    assert result.exit_code == 2 and "ep_placement: 8 ranks cannot each hold one of 4 experts" in result.output, \
        result.output


def test_a_worker_refuses_a_placement_without_shards():
    with pytest.raises(ValueError, match="ep_placement: needs ep_shards"):
        load_config(WorkerConfig, flags={"model_dir": str(DEMO_MODEL), "scheduler": "127.0.0.1:1",
                                         "ep_placement": "0,0,1,1"})


def test_unreadable_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(SchedulerConfig, file=bad)


def test_environment_values_are_typed_by_their_field():
    env = {"MOEMESH_SCHEDULER_CLUSTER_TOKEN": "12345678", "MOEMESH_SCHEDULER_PREFERRED_BATCH_SIZES": "[4, 8]",
           "MOEMESH_SCHEDULER_TENANT_WEIGHTS": '{"alpha": 2}'}
    config = load_config(SchedulerConfig, env=env)
    assert config.cluster_token.get_secret_value() == "12345678", "a numeric-looking token is still a token"
    assert config.preferred_batch_sizes == [4, 8] and config.tenant_weights == {"alpha": 2.0}
    with pytest.raises(ValueError, match=r"\bmetrics_port\b"):
        load_config(SchedulerConfig, env={"MOEMESH_SCHEDULER_METRICS_PORT": "null"})  # not silently None


def test_secret_files_override_the_file_and_yield_to_the_environment(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "MOEMESH_SCHEDULER_CLUSTER_TOKEN").write_text("from-a-secret")
    (secrets / "MOEMESH_SCHEDULER_PORT").write_text("4444")
    file = tmp_path / "scheduler.json"
    file.write_text(json.dumps({"cluster_token": "from-the-file", "port": 1111}))
    config = load_config(SchedulerConfig, file=file, secrets_dir=secrets, env={"MOEMESH_SCHEDULER_PORT": "5555"})
    assert config.cluster_token.get_secret_value() == "from-a-secret", "a secret file must win over the config file"
    assert config.port == 5555, "the environment must win over a secret file"
    with pytest.raises(ValueError, match="secrets directory"):
        load_config(SchedulerConfig, secrets_dir=tmp_path / "missing")


@pytest.mark.parametrize("cls", [GatewayConfig, SchedulerConfig, WorkerConfig])
def test_every_setting_is_a_flag_whose_help_is_its_description(cls):
    parser = argparse.ArgumentParser(prog="moemesh-test")
    add_flags(parser, cls)
    text = " ".join(parser.format_help().split())
    for name, field in cls.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, f"{cls.__name__}.{name} has no flag"
        assert field.description, f"{cls.__name__}.{name} has no description for its --help"
        assert " ".join(field.description.split())[:40] in text, f"{cls.__name__}.{name}: help is not its description"


def test_flags_are_typed_and_only_the_given_ones_override(tmp_path):
    parser = argparse.ArgumentParser(prog="moemesh-test")
    source = add_flags(parser, SchedulerConfig)
    args = parser.parse_args(["--port", "7", "--preferred-batch-sizes", "[2, 4]"])
    config = load_config(SchedulerConfig, env={"MOEMESH_SCHEDULER_HEARTBEAT_INTERVAL": "0.25"},
                         flags=flag_values(source, args))
    assert (config.port, config.preferred_batch_sizes) == (7, [2, 4])
    assert config.heartbeat_interval == 0.25, "a flag that was not given must not hide the environment"
    parser = argparse.ArgumentParser(prog="moemesh-test")
    source = add_flags(parser, WorkerConfig)
    (tmp_path / "config.json").write_text("{}")
    args = parser.parse_args(["--model-dir", str(tmp_path), "--scheduler", "x:1", "--no-enable-prefix-caching"])
    assert load_config(WorkerConfig, flags=flag_values(source, args)).enable_prefix_caching is False


@pytest.mark.parametrize(("cls", "service", "required"), [
    (SchedulerConfig, "SCHEDULER", {}),
    (GatewayConfig, "GATEWAY", {"scheduler": "127.0.0.1:1"}),
])
def test_every_service_reads_the_cluster_token_from_its_environment_or_a_secret_file(tmp_path, cls, service, required):
    variable = f"MOEMESH_{service}_CLUSTER_TOKEN"  # the names `moemesh up` passes to its children
    config = load_config(cls, env={variable: "from-the-environment"}, flags=required)
    assert config.cluster_token.get_secret_value() == "from-the-environment"
    (tmp_path / variable).write_text("from-a-secret-file\n")
    config = load_config(cls, secrets_dir=tmp_path, flags=required)
    assert config.cluster_token.get_secret_value() == "from-a-secret-file", "a trailing newline is not the token"


def test_the_worker_reads_the_cluster_token_from_its_environment(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = load_config(WorkerConfig, env={"MOEMESH_WORKER_CLUSTER_TOKEN": "worker-side-token"},
                         flags={"model_dir": str(tmp_path), "scheduler": "127.0.0.1:1"})
    assert config.cluster_token.get_secret_value() == "worker-side-token"


@pytest.mark.parametrize("cls", [SchedulerConfig, GatewayConfig])
def test_a_cluster_token_never_shows_in_the_config_repr_and_an_empty_one_is_refused(cls):
    config = load_config(cls, env={"MOEMESH_SCHEDULER_CLUSTER_TOKEN": "do-not-print-me",
                                   "MOEMESH_GATEWAY_CLUSTER_TOKEN": "do-not-print-me"}, flags={"scheduler": "x:1"}
                         if cls is GatewayConfig else {})
    assert "do-not-print-me" not in repr(config) and "do-not-print-me" not in str(config.model_dump())
    env = {"MOEMESH_SCHEDULER_CLUSTER_TOKEN": "", "MOEMESH_GATEWAY_CLUSTER_TOKEN": ""}
    with pytest.raises(ValueError, match=r"\bcluster_token\b"):  # an unset variable in a compose file: fail closed
        load_config(cls, env=env, flags={"scheduler": "x:1"} if cls is GatewayConfig else {})


def test_a_secret_on_the_command_line_is_refused_naming_where_it_belongs():
    """`ps` shows every process's argv to every user: the cluster token never comes from a flag."""
    parser = argparse.ArgumentParser(prog="moemesh-test")
    source = add_flags(parser, SchedulerConfig)
    args = parser.parse_args(["--cluster-token", "00012345"])
    with pytest.raises(ValueError, match="cluster_token: a secret is not taken from the command line.*"
                                         "MOEMESH_SCHEDULER_CLUSTER_TOKEN"):
        load_config(SchedulerConfig, flags=flag_values(source, args))


@pytest.mark.parametrize(("value", "port"), [("off", None), ("OFF", None), ("", None), ("0", 0), ("9464", 9464)])
def test_a_metrics_port_may_be_turned_off_by_name(value, port):
    """`moemesh up` turns metrics on with port 0 unless MOEMESH_<SERVICE>_METRICS_PORT says otherwise: "off" must
    be a way to say so."""
    config = load_config(GatewayConfig, env={"MOEMESH_GATEWAY_METRICS_PORT": value}, flags={"scheduler": "x:1"})
    assert config.metrics_port == port


def test_a_metrics_port_out_of_range_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="metrics_port"):
        load_config(GatewayConfig, env={"MOEMESH_GATEWAY_METRICS_PORT": "70000"}, flags={"scheduler": "x:1"})
