"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The synthetic-trace generator lives with the benchmarks (it is also their data source).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from moecap.schemas import EngineInfo, ModelInfo, MoEInfo, RunMetadata


@pytest.fixture
def run_meta() -> RunMetadata:
    """A small run's metadata (Qwen1.5-MoE-shaped expert layout)."""
    return RunMetadata(
        run_id="20261124T000000Z-hf-test-0000",
        engine=EngineInfo(name="hf", version="5.17.0"),
        model=ModelInfo(id="Qwen/Qwen1.5-MoE-A2.7B", config={"model_type": "qwen2_moe"}),
        moe=MoEInfo(layer_ids=list(range(24)), num_experts=60, top_k=4),
    )


@pytest.fixture
def synthetic_run(tmp_path):
    """A small simulated run (steps, experts, requests, outputs) and its ground truth."""
    from synthetic_traces import SimConfig, simulate_run

    out = tmp_path / "trace"
    truth = simulate_run(out, SimConfig())
    return out, truth


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3-compatible endpoint on loopback (moto's server mode) with an empty bucket; yields
    `s3://<bucket>`. The AWS_* variables point pyarrow, boto3 and child processes (Ray workers) at
    it while the module runs; the server stops afterwards."""
    import logging
    import os

    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # moto keeps its buckets per process, not per server: a bucket of its own per module.
    import uuid

    bucket = f"fleet-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
