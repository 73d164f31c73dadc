"""Service configuration: merge order and errors that name the field."""

from __future__ import annotations

import json

import pytest

from moemesh.gateway.config import GatewayConfig
from moemesh.services.core.config import load_config
from moemesh.services.scheduler.config import SchedulerConfig
from moemesh.worker.server.config import WorkerConfig


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


def test_unreadable_config_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(SchedulerConfig, file=bad)
