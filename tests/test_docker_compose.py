"""The compose file parses, and every command in it is accepted by our own parsers (this
machine has no Docker engine, so nothing is started)."""

from __future__ import annotations

from pathlib import Path

import yaml

from launcher import cli, rendezvous
from trainer.config import parse_config

COMPOSE = Path(__file__).resolve().parent.parent / "docker" / "docker-compose.yml"


def test_every_compose_command_parses(tmp_path, monkeypatch):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"rendezvous", "node1", "node2", "node3"} <= set(services)
    nodes = 0
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "ftlaunch", name
        if command[1] == "rendezvous":
            assert rendezvous.parse_args(command[2:]).port == 29400
            continue
        args = cli.parse_args(command[1:])
        assert args.rdzv_endpoint == "rendezvous:29400" and args.nnodes == "2:3"
        assert "is_host=false" in args.rdzv_conf  # no node hosts the store
        assert args.local_addr == service["hostname"]
        script_args = args.training_script_args
        assert args.training_script == "train.py"
        monkeypatch.chdir(tmp_path)
        config = parse_config(script_args)
        assert config.ckpt_dir == "/shared/ckpt"
        nodes += 1
        assert "ckpt:/shared" in service["volumes"]
    assert nodes == 3


def test_dockerfile_installs_the_project():
    text = (COMPOSE.parent / "Dockerfile").read_text()
    for path in ("checkpoint", "trainer", "launcher", "train.py", "pyproject.toml"):
        assert path in text
    assert "pip install" in text
