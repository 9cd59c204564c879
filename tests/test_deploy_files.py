"""Deployment files only name settings and commands that exist."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from freezeps.cli import build_parser
from freezeps.config import Config

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {f"FREEZEPS_{f.name.upper()}" for f in fields(Config)}
COMMANDS = set(build_parser()._subparsers._group_actions[0].choices)


def test_env_files_name_real_settings():
    for env in (ROOT / "deploy").glob("*.env"):
        keys = [line.split("=", 1)[0] for line in env.read_text().splitlines() if line and not line.startswith("#")]
        assert keys, env
        assert set(keys) <= SETTINGS, (env.name, set(keys) - SETTINGS)


def test_compose_names_real_settings_and_commands():
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\b(FREEZEPS_[A-Z_]+)\s*:", text))
    assert used and used <= SETTINGS, used - SETTINGS
    for command in re.findall(r'command: \["(\w+)"', text):
        assert command in COMMANDS
    assert '"freezeps", "status"' in text  # the health check uses the Status RPC


def test_units_run_real_commands_with_hardening():
    for unit in ("freezeps-ps.service", "freezeps-worker@.service"):
        text = (ROOT / "deploy" / unit).read_text()
        command = re.search(r"ExecStart=\S+/freezeps (\w+)", text).group(1)
        assert command in COMMANDS
        for directive in ("User=freezeps", "NoNewPrivileges=true", "PrivateTmp=true", "ProtectSystem=strict",
                          "Restart=on-failure", "EnvironmentFile=/etc/freezeps/"):
            assert directive in text, (unit, directive)


def test_readme_documents_every_setting():
    import importlib.util
    spec = importlib.util.spec_from_file_location("readme_flags", ROOT / "scripts" / "readme_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.render(readme) == readme, "README's settings table is stale: run `make readme`"
    assert all(f"--{f.name.replace('_', '-')}" in readme for f in fields(Config))
