"""The committed generated code matches proto/pitcher.proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pitcher_rpc.pb import pitcher_pb2

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = (
    "python -m grpc_tools.protoc -I proto --python_out=pitcher_rpc/pb"
    " --pyi_out=pitcher_rpc/pb proto/pitcher.proto"
)


def test_generated_code_is_current(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools is not installed (pip install grpcio-tools) so protoc cannot run")
    protoc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            f"--python_out={tmp_path}",
            "proto/pitcher.proto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert protoc.returncode == 0, f"protoc refused proto/pitcher.proto:\n{protoc.stderr}"
    generated = tmp_path / "pitcher_pb2.py"
    assert generated.exists(), f"protoc wrote nothing to {tmp_path}"
    # Imported under a name of its own: the committed module stays the one in use.
    name = f"fresh_pitcher_pb2_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, generated)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(fresh)
    except TypeError as exc:
        # The default descriptor pool refuses a second, different definition
        # of pitcher.proto with "Couldn't build proto file ..."
        pytest.fail(f"pitcher_rpc/pb/pitcher_pb2.py is out of date ({exc}); run: {REGENERATE}")
    finally:
        sys.modules.pop(name, None)
    # Descriptors, not file text: the same schema from another protoc is still current.
    assert fresh.DESCRIPTOR.serialized_pb == pitcher_pb2.DESCRIPTOR.serialized_pb, (
        f"pitcher_rpc/pb/pitcher_pb2.py does not match proto/pitcher.proto; run: {REGENERATE}"
    )
