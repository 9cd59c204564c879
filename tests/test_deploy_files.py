"""Deployment files: the compose file against the compose specification, the systemd units with
systemd-analyze, and every setting and command they name against the CLI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from freezeps.cli import build_parser
from freezeps.config import PS, WORKER, Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {f"FREEZEPS_{f.name.upper()}": f for f in fields(Config)}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= reads the simple ones (# comments)."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


def assert_settings_for(role: str, env: dict[str, str], where: str) -> Config:
    """Every FREEZEPS_ variable is a setting `role` reads, and together they make a valid Config."""
    ours = {k: v for k, v in env.items() if k.startswith("FREEZEPS_")}
    assert ours, where
    unknown = set(ours) - set(SETTINGS)
    assert not unknown, (where, unknown)
    unread = {k for k in ours if role not in SETTINGS[k].metadata["roles"]}
    assert not unread, (where, f"{role} does not read", unread)
    return load_config(environ=ours)


@pytest.mark.parametrize("role", [PS, WORKER])
def test_env_files_name_settings_the_role_reads(role):
    env = read_env_file(ROOT / "deploy" / f"{role}.env")
    cfg = assert_settings_for(role, env, f"{role}.env")
    assert cfg.tls and cfg.token_file  # the deployed service authenticates its callers
    if role == PS:
        assert not cfg.listen.startswith("127.") and cfg.tls_client_auth and cfg.auto_resume


@pytest.mark.parametrize("role", [PS, WORKER])
def test_install_script_installs_every_file_the_env_file_names(role):
    script = (ROOT / "deploy" / "install.sh").read_text()
    files = set(re.search(rf"^\s*{role}\) FILES=\(([^)]*)\)", script, re.M).group(1).split())
    named = {Path(v).name for v in read_env_file(ROOT / "deploy" / f"{role}.env").values()
             if v.startswith("/etc/freezeps/")}
    assert named and named <= files, named - files
    subprocess.run(["bash", "-n", str(ROOT / "deploy" / "install.sh")], check=True, timeout=30)


def _compose_config() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/setup.sh --test installs Debian's where apt can)")
    env = {**os.environ, "WORKERS": "3", "MTLS": "true"}
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr  # the file is valid against the compose specification
    return yaml.safe_load(out.stdout)


def test_compose_file_is_valid_and_names_real_commands_and_settings():
    compose = _compose_config()
    services = compose["services"]
    parser = build_parser()
    roles = {}
    for name, service in services.items():
        args = parser.parse_args(service["command"])  # exits (fails the test) on an unknown command or flag
        roles[name] = args.command
        env = service.get("environment", {})
        if args.command in (PS, WORKER):
            cfg = assert_settings_for(args.command, {k: str(v) for k, v in env.items()}, name)
            assert cfg.tls and cfg.token_file.startswith("/secrets/"), name
            mounts = {v.split(":")[1]: v for v in service["volumes"]} if isinstance(service["volumes"][0], str) \
                else {v["target"]: v for v in service["volumes"]}
            assert "/secrets" in mounts and "/runs" in mounts, name
    assert roles == {"certs": "certs", "ps": PS, "worker": WORKER}
    ps, worker = services["ps"], services["worker"]
    # N workers from one variable, and the PS waits for as many.
    assert worker["deploy"]["replicas"] == 3 and str(ps["environment"]["FREEZEPS_NUM_WORKERS"]) == "3"
    assert str(ps["environment"]["FREEZEPS_TLS_CLIENT_AUTH"]).lower() == "true"
    # The health check runs the status command (the Status RPC); workers wait for it to pass.
    health = ps["healthcheck"]["test"]
    assert health[:3] == ["CMD", "freezeps", "status"]
    assert parser.parse_args(health[2:]).command == "status"
    assert worker["depends_on"]["ps"]["condition"] == "service_healthy"
    assert ps["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    # Logs and checkpoints land in the runs volume; the PS's certificate names the host workers dial.
    assert ps["environment"]["FREEZEPS_RUN_LOG"].startswith("/runs/")
    assert ps["environment"]["FREEZEPS_CHECKPOINT_DIR"].startswith("/runs/")
    certs = parser.parse_args(services["certs"]["command"])
    assert worker["environment"]["FREEZEPS_PS_ADDRESS"].rsplit(":", 1)[0] in certs.ps_host
    assert set(compose["volumes"]) >= {"runs", "secrets"}


def test_compose_check_catches_a_bad_file(tmp_path):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    bad = (ROOT / "docker-compose.yml").read_text().replace("    healthcheck:", "    healthcheck_typo:", 1)
    (tmp_path / "docker-compose.yml").write_text(bad)
    out = subprocess.run(["docker-compose", "config", "-q"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and "healthcheck_typo" in out.stderr


UNITS = ("freezeps-ps.service", "freezeps-worker@.service")


@pytest.mark.parametrize("unit", UNITS)
def test_units_run_real_commands_with_hardening(unit):
    text = (ROOT / "deploy" / unit).read_text()
    command = re.search(r"^ExecStart=\S+/freezeps (.*)$", text, re.M).group(1)
    assert build_parser().parse_args(command.split()).command in (PS, WORKER)
    env_file = re.search(r"^EnvironmentFile=/etc/freezeps/(\S+)$", text, re.M).group(1)
    assert (ROOT / "deploy" / env_file).is_file()
    for directive in ("User=freezeps", "NoNewPrivileges=true", "PrivateTmp=true", "ProtectSystem=strict",
                      "Restart=on-failure", "RestartSec=", "StartLimitBurst=", "StandardOutput=journal",
                      "CapabilityBoundingSet=\n"):
        assert directive in text, (unit, directive)
    assert "RestartSteps=" in (ROOT / "deploy" / "10-backoff.conf").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    """Verified as written, but for ExecStart's path, which points at this checkout's freezeps
    instead of /opt/freezeps (verify insists the program exists)."""
    program = Path(sys.executable).parent / "freezeps"
    names = []
    for unit in UNITS:
        text = (ROOT / "deploy" / unit).read_text().replace("/opt/freezeps/.venv/bin/freezeps", str(program))
        name = unit.replace("@.", "@0.")  # an instance of the template
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    out = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr  # warnings (unknown keys) fail too


def test_readme_documents_every_setting():
    import importlib.util
    spec = importlib.util.spec_from_file_location("readme_flags", ROOT / "scripts" / "readme_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.render(readme) == readme, "README's settings table is stale: run `make readme`"
    assert all(f"--{f.name.replace('_', '-')}" in readme for f in fields(Config))
