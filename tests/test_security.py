"""TLS, mutual TLS and the token: runs that work, and callers that are refused and change nothing.

Certificates come from `freezeps certs` (freezeps.certs.make_secrets) in a temporary folder.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from freezeps.certs import make_secrets
from proto import freezeps_pb2 as pb
from proto import freezeps_pb2_grpc as pb_grpc
from proto.security import AUTH_METADATA, Auth, AuthError, check_listen, is_loopback, open_channel, read_auth
from tests.conftest import good_chunks, init_messages, one_worker, run_workers, running_ps, worker_settings

FREEZEPS = [sys.executable, "-m", "freezeps"]


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secrets")
    make_secrets(out, ["ps.example"], ["worker"])
    return out


def _auth(folder: Path, **files) -> Auth:
    return read_auth(**{k: str(folder / v) if isinstance(v, str) else v for k, v in files.items()})


def ps_tls(d: Path, mutual: bool = False, token: bool = False) -> Auth:
    return _auth(d, tls=True, cert="ps.pem", key="ps.key", **({"ca": "ca.pem", "client_auth": True} if mutual else {}),
                 **({"token_file": "token"} if token else {}))


def worker_tls(d: Path, mutual: bool = False, token: bool = False) -> Auth:
    return _auth(d, tls=True, ca="ca.pem", **({"cert": "worker.pem", "key": "worker.key"} if mutual else {}),
                 **({"token_file": "token"} if token else {}))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_runs_over_tls_and_mutual_tls_with_a_token(secrets_dir, mutual):
    with running_ps(num_workers=2, auth=ps_tls(secrets_dir, mutual, token=True)) as ps:
        summaries = run_workers([worker_settings(ps.address, auth=worker_tls(secrets_dir, mutual, token=True))
                                 for _ in range(2)])
        assert [s["steps"] for s in summaries] == [6, 6]
        assert ps.server.step == 6


def _status_code(address: str, auth: Auth) -> grpc.StatusCode:
    with open_channel(address, auth) as channel:
        try:
            pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_workers_check_the_ps_certificate(secrets_dir, tmp_path):
    other = tmp_path / "other"
    make_secrets(other, [], [])  # another CA, whose PS certificate names 127.0.0.1 too
    with running_ps(num_workers=1, auth=ps_tls(other)) as ps:
        assert _status_code(ps.address, worker_tls(secrets_dir)) == grpc.StatusCode.UNAVAILABLE
        assert _status_code(ps.address, worker_tls(other)) == grpc.StatusCode.OK
    # The right CA but a name the certificate does not hold: refused too.
    with running_ps(num_workers=1, auth=ps_tls(secrets_dir)) as ps, \
            grpc.secure_channel(f"localhost:{ps.port}", worker_tls(secrets_dir).channel_credentials(),
                                options=[("grpc.ssl_target_name_override", "not-the-ps.example")]) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _calls(worker_id: str, flat):
    """One well-formed call of every method, as (name, invoke(stub, metadata))."""
    push = [pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, step=0, batch_size=8))]
    push += [pb.PushMessage(chunk=c) for c in good_chunks(flat)]
    init = init_messages(worker_id, flat, 10)
    return [
        ("Join", lambda s, md: s.Join(pb.JoinRequest(worker_name="x", manifest=flat.manifest), timeout=10, metadata=md)),
        ("Init", lambda s, md: s.Init(iter(init), timeout=10, metadata=md)),
        ("Push", lambda s, md: s.Push(iter(push), timeout=10, metadata=md)),
        ("Pull", lambda s, md: list(s.Pull(pb.PullRequest(worker_id=worker_id, step=0), timeout=10, metadata=md))),
        ("Status", lambda s, md: s.Status(pb.StatusRequest(), timeout=10, metadata=md)),
        ("Leave", lambda s, md: s.Leave(pb.LeaveRequest(worker_id=worker_id), timeout=10, metadata=md)),
    ]


def _state(ps) -> tuple:
    status = ps.server.status()
    return ps.server.step, status.live_workers, status.SerializeToString(), ps.server.values_by_name()


def _same(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(np.array_equal(a[3][k], b[3][k]) for k in a[3])


def test_every_method_refuses_a_missing_or_wrong_token_and_changes_nothing(secrets_dir):
    auth = _auth(secrets_dir, token_file="token")
    token = auth.token.decode()
    bad = [(None, grpc.StatusCode.UNAUTHENTICATED),
           (((AUTH_METADATA, "Bearer " + "x" * len(token)),), grpc.StatusCode.PERMISSION_DENIED),
           (((AUTH_METADATA, "Bearer " + token[:-1]),), grpc.StatusCode.PERMISSION_DENIED),
           (((AUTH_METADATA, token),), grpc.StatusCode.PERMISSION_DENIED),  # no "Bearer "
           ((("x-other", "Bearer " + token),), grpc.StatusCode.UNAUTHENTICATED)]
    with one_worker(auth=auth) as (ps, _, worker_id, flat), grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        flat.grads[0].fill_(0.5)
        before = _state(ps)
        refused = {}
        for method, call in _calls(worker_id, flat):
            for metadata, code in bad:
                with pytest.raises(grpc.RpcError) as err:
                    call(stub, metadata)
                assert err.value.code() == code, (method, metadata)
                assert token not in err.value.details()
                refused[method] = refused.get(method, 0) + 1
            assert _same(_state(ps), before), method
        assert refused == {m: len(bad) for m in ("Join", "Init", "Push", "Pull", "Status", "Leave")}
        # With the token, the same push goes through and changes the values.
        push = dict(_calls(worker_id, flat))["Push"]
        push(stub, ((AUTH_METADATA, "Bearer " + token),))
        assert ps.server.step == 1 and not _same(_state(ps), before)


def test_mutual_tls_refuses_callers_without_a_client_certificate(secrets_dir, tmp_path):
    other = tmp_path / "other"
    make_secrets(other, [], ["worker"])  # a client certificate from a CA the PS does not trust
    foreign = worker_tls(other, mutual=True)
    strangers = [worker_tls(secrets_dir),  # no client certificate
                 Auth(tls=True, ca=worker_tls(secrets_dir).ca, cert=foreign.cert, key=foreign.key)]
    with one_worker(auth=ps_tls(secrets_dir, mutual=True), client=worker_tls(secrets_dir, mutual=True)) as (
            ps, _, worker_id, flat):
        before = _state(ps)
        refused = 0
        for stranger in strangers:
            with open_channel(ps.address, stranger) as channel:
                stub = pb_grpc.ParameterServerStub(channel)
                for method, call in _calls(worker_id, flat):
                    with pytest.raises(grpc.RpcError) as err:
                        call(stub, None)
                    # Refused in the handshake: the call never reaches the service.
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, method
                    refused += 1
        assert refused == 2 * 6
        assert _same(_state(ps), before)


def test_listen_addresses():
    assert all(is_loopback(a) for a in ("127.0.0.1:1", "127.3.4.5:1", "[::1]:1", "localhost:1", "unix:/tmp/s"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "ps-node:1"))
    for address in ("0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "ps-node:50051"):
        with pytest.raises(AuthError, match="refusing to listen"):
            check_listen(address, Auth(), insecure=False)
        check_listen(address, Auth(), insecure=True)
        check_listen(address, Auth(token=b"t" * 16), insecure=False)
        check_listen(address, Auth(tls=True, cert=b"c", key=b"k", ca=b"a", client_auth=True), insecure=False)
        with pytest.raises(AuthError, match="with TLS but without authenticating callers"):
            check_listen(address, Auth(tls=True, cert=b"c", key=b"k"), insecure=False)  # serves anyone
    check_listen("127.0.0.1:50051", Auth(), insecure=False)


def test_ps_refuses_to_listen_publicly_without_credentials(secrets_dir):
    # Refused before anything binds; with a token the same address would be served.
    out = subprocess.run(FREEZEPS + ["ps", "--listen", "0.0.0.0:50051"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0:50051" in out.stderr and "--insecure" in out.stderr


@pytest.mark.parametrize("argv, words", [
    (["ps", "--tls"], "tls needs tls_cert and tls_key"),
    (["ps", "--tls-cert", "x.pem"], "only apply with tls on"),
    (["ps", "--tls", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "cannot read /nonexistent"),
    (["ps", "--token-file", "/nonexistent"], "token_file: cannot read /nonexistent"),
    (["worker", "--tls", "--tls-ca", "SECRETS/token"], "holds no PEM CERTIFICATE"),
    (["worker", "--token-file", "SECRETS/ca.pem"], "one printable ASCII token"),
])
def test_unusable_credentials_are_a_clear_error(secrets_dir, argv, words):
    argv = [a.replace("SECRETS", str(secrets_dir)) for a in argv]
    out = subprocess.run(FREEZEPS + argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_status_command_presents_the_token(secrets_dir):
    auth = _auth(secrets_dir, token_file="token")
    with running_ps(num_workers=1, auth=auth) as ps:
        refused = subprocess.run(FREEZEPS + ["status", ps.address], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        env = {**os.environ, "FREEZEPS_TOKEN_FILE": str(secrets_dir / "token")}
        ok = subprocess.run(FREEZEPS + ["status", ps.address], capture_output=True, text=True, timeout=60, env=env)
        assert ok.returncode == 0 and '"numWorkers": 1' in ok.stdout


def test_certs_helper_files_and_reuse(tmp_path):
    written, kept = make_secrets(tmp_path, ["10.0.0.1", "ps-node"], ["w0", "w1"])
    names = {p.name for p in written}
    assert names == {"ca.pem", "ca.key", "ps.pem", "ps.key", "w0.pem", "w0.key", "w1.pem", "w1.key", "token"}
    assert not kept
    for name in ("ca.key", "ps.key", "w0.key", "token"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    ps_pem = (tmp_path / "ps.pem").read_bytes()
    # Again, with one more client: the CA signs it, nothing that exists is replaced.
    written, kept = make_secrets(tmp_path, ["10.0.0.1"], ["w0", "w2"])
    assert {p.name for p in written} == {"w2.pem", "w2.key"}
    assert (tmp_path / "ps.pem").read_bytes() == ps_pem and len(kept) == 4  # ca, ps, w0, token
    with pytest.raises(ValueError, match="client name"):
        make_secrets(tmp_path, [], ["../evil"])
    # The new client's certificate is good for mutual TLS against the same CA.
    with running_ps(num_workers=1, auth=_auth(tmp_path, tls=True, cert="ps.pem", key="ps.key", ca="ca.pem",
                                              client_auth=True)) as ps:
        assert _status_code(ps.address, _auth(tmp_path, tls=True, ca="ca.pem", cert="w2.pem", key="w2.key")) \
            == grpc.StatusCode.OK
        # The PS's own certificate is a client one too: compose's health check runs with it.
        assert _status_code(ps.address, _auth(tmp_path, tls=True, ca="ca.pem", cert="ps.pem", key="ps.key")) \
            == grpc.StatusCode.OK


def _argv_of_processes_under(folder: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in argv:
            found.append(argv)
    return found


def test_secrets_stay_out_of_argv_logs_and_config(tmp_path):
    """A whole `freezeps run` with mutual TLS and a token: no secret in any process's argv
    (what `ps` shows), in the logs or in the written configuration."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(FREEZEPS + ["run", "--model", "mlp", "--dataset", "synthetic", "--weights", "random",
                                        "--image-size", "8", "--num-workers", "2", "--batch-size", "16", "--steps", "40",
                                        "--train-samples", "0", "--test-samples", "0", "--freeze", "none",
                                        "--tls", "--tls-client-auth", "--log-level", "debug", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    argvs: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            argvs += _argv_of_processes_under(run_dir)
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    secrets = {name: (run_dir / "secrets" / name).read_text().strip() for name in ("token", "ps.key", "worker.key")}
    keys = {name: "".join(text.splitlines()[1:-1]) for name, text in secrets.items() if name.endswith(".key")}
    assert any(" worker " in a for a in argvs) and any(" ps " in a for a in argvs)
    texts = {"argv": "\n".join(argvs), "stdout": out}
    texts.update({p.name: p.read_text(errors="replace") for p in run_dir.iterdir() if p.is_file()})
    assert "ps.jsonl" in texts and "config.toml" in texts
    for where, text in texts.items():
        assert secrets["token"] not in text, where
        assert not any(key[:40] in text.replace("\n", "") for key in keys.values()), where
