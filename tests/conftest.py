"""Shared fixtures: one local Ray cluster per test session, tiny job specs, temporary storage."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from workers.rank import use_prebuilt_ops  # noqa: E402

use_prebuilt_ops()  # every test process and its children use the DeepSpeed ops `make install` built

import pytest


@pytest.fixture(autouse=True)
def _ray_auth_mode_does_not_leak():
    """An in-process CLI call sets Ray's auth settings for the Ray it would start; the test session's Ray must not see them."""
    before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster():
    """A ray.cluster_utils.Cluster with one head node; multi-node tests add and remove nodes."""
    import ray
    from ray.cluster_utils import Cluster

    import torch

    torch.set_num_threads(1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    ray.init(address=cluster.address, namespace="switchyard-tests", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory):
    """One storage root for the session so the token cache is built once."""
    return str(tmp_path_factory.mktemp("storage"))


@pytest.fixture
def cluster_cfg(storage_root, tmp_path):
    from orchestrator.cluster_config import ClusterConfig

    return ClusterConfig.model_validate({"storage": storage_root, "job_store": str(tmp_path / "jobs.db")})


def tiny_spec(**overrides):
    """A job that trains in seconds: tiny LLaMA, short sequences, a small slice of the built-in corpus."""
    from specs.job import apply_overrides, validate_spec

    raw = {
        "name": "t",
        "model": {"family": "llama", "preset": "tiny"},
        "data": {"corpus": "builtin:stdlib", "seq_len": 64, "max_docs": 400},
        "train": {"steps": 8, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"every": 4, "keep": 5},
        "eval": {"held_out_tokens": 2048, "batches": 2},
    }
    return validate_spec(apply_overrides(raw, overrides))


def wait_for(cond, timeout=240, every=0.3, what="condition"):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def controller(ray_cluster, storage_root, tmp_path):
    """A real detached controller actor in its own namespace, with its own job store.

    No warm pool (``pooled_controller`` in tests/test_warm_pool.py has one): these tests count Ray's free
    CPUs, and a pool each test fills and kills costs as much as the cold start it saves."""
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.controller import start_controller, stop_controller

    cfg = ClusterConfig.model_validate({"storage": storage_root, "job_store": str(tmp_path / "jobs.db"),
                                        "ray": {"namespace": f"ctl-{tmp_path.name}"},
                                        "workers": {"warm_pool": 0}})
    handle = start_controller(cfg, tick_s=0.3, backfill_window_s=120)
    yield cfg, handle
    stop_controller(cfg.ray.namespace)
