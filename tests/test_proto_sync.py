"""The committed generated code is what grpc_tools makes from proto/freezeps.proto today."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("freezeps_pb2.py", "freezeps_pb2_grpc.py", "freezeps_pb2.pyi")


def test_generated_code_is_in_sync(tmp_path):
    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "freezeps.proto", tmp_path / "proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "--pyi_out=.", "proto/freezeps.proto"], cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_text()
        assert fresh == (ROOT / "proto" / name).read_text(), \
            f"proto/{name} is stale: run `make proto` (see README) and commit the result"
