"""The checked-in stubs must match what protoc generates from protos/v1/pearl.proto."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos",
                    ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", "protos/v1/pearl.proto"],
                   cwd=tmp_path, check=True)
    for name in ("pearl_pb2.py", "pearl_pb2.pyi", "pearl_pb2_grpc.py"):
        fresh, checked_in = tmp_path / "protos/v1" / name, ROOT / "protos/v1" / name
        assert filecmp.cmp(fresh, checked_in, shallow=False), (
            f"protos/v1/{name} is stale: run `make protos`")
