"""The Ray session of a run: a local Ray or the cluster it joins, the workers' scaling checked
against what the cluster has, storage every node can reach, the training processes' env."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config.env import Settings
from pipeline.config.params import Params, ParamsError
from pipeline.data.atomic import is_object_store
from pipeline.tracking.runs import ensure_reachable, tracking_uri

# glibc malloc settings for the training processes, set where Ray starts them (glibc reads them
# at process start): freed activations stay in the heap instead of being unmapped and faulted
# back each batch; one arena, as Ray Train's training thread trimmed its own (bench/README.md).
# The mmap threshold is the largest glibc accepts.
TRAINING_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_ARENA_MAX": "1",
}
# For a Ray this process starts on its own machine: workers polled more often (a run's end is
# seen sooner), no preemption watcher (no node drains to watch for); bench/README.md.
LOCAL_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            configure_logging=False,
            runtime_env=None if address else {"env_vars": LOCAL_RAY_TRAIN_ENV | TRAINING_ENV},
        )
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def resolve_scaling(params: Params) -> bool:
    """Whether the workers use GPUs ("auto": if the cluster has any), once `train.scaling`
    is checked against the cluster."""
    scaling = params.train.scaling
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    use_gpu = gpus >= 1 if scaling.use_gpu == "auto" else scaling.use_gpu
    if use_gpu and gpus < scaling.num_workers:
        raise ParamsError(
            f"train.scaling.use_gpu: {scaling.num_workers} workers need one GPU each, "
            f"the Ray cluster has {gpus:g}"
        )
    needed = scaling.num_workers * scaling.cpus_per_worker
    if needed > cpus:
        raise ParamsError(
            f"train.scaling: {scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs "
            f"= {needed} CPUs, the Ray cluster has {cpus:g}"
        )
    return use_gpu


class StorageError(ValueError):
    """`train.storage_path` cannot hold checkpoints for this cluster."""


def check_object_store(path: str, key: str = "train.storage_path") -> None:
    """Before Ray starts: an s3:// `path` must be usable with this environment's keys (those
    every node has in a deployment)."""
    if urlparse(path).scheme != "s3":
        return  # a folder (checked on the cluster), or another store's own SDK errors
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        message = f"{key}: {path} needs boto3 (pip install 'mnist-pipeline[cloud]')"
        raise StorageError(message) from None
    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise StorageError(
            f"{key}: {path}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2})
    client = session.client("s3", config=config)
    bucket, where = urlparse(path).netloc, client.meta.endpoint_url
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        problems = {
            "NoSuchBucket": f"bucket {bucket!r} does not exist",
            "InvalidAccessKeyId": f"the access key {credentials.access_key!r} is unknown",
            "SignatureDoesNotMatch": "the secret key does not match AWS_ACCESS_KEY_ID",
        }
        problem = problems.get(code, f"the keys of {credentials.access_key!r} may not use it")
        raise StorageError(f"{key}: {path} on {where}: {problem} ({code})") from None
    except BotoCoreError as error:
        raise StorageError(
            f"{key}: {path}: the S3 endpoint {where} (AWS_ENDPOINT_URL) is unreachable: {error}"
        ) from None


def preflight(params: Params, settings: Settings) -> str:
    """The tracking URI, once its server takes our credentials and the checkpoint store our
    keys: the CLI calls it before its slow imports, so bad set-up is told in seconds."""
    uri = tracking_uri(settings)
    ensure_reachable(uri)
    check_object_store(params.train.storage_path)
    return uri


@ray.remote(num_cpus=0)
def _sees(probe: str) -> bool:
    return Path(probe).is_file()


def unreachable_nodes(folder: Path) -> list[str]:
    """Alive nodes (IP and id) that do not see a file written here in `folder`: node-local."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".storage-probe-{uuid.uuid4().hex}"
    probe.write_text("written by the driver; every Ray node must see this file\n")
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]
        pinned = (NodeAffinitySchedulingStrategy(node["NodeID"], soft=False) for node in nodes)
        seen = ray.get([_sees.options(scheduling_strategy=s).remote(str(probe)) for s in pinned])
    finally:
        probe.unlink(missing_ok=True)
    return [
        f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        for node, ok in zip(nodes, seen, strict=True)
        if not ok
    ]


def check_storage(path: str) -> str:
    """The storage URI for Ray Train (a folder made absolute: the job's cwd is not the user's),
    once every node can reach it."""
    if is_object_store(path):
        return path
    uri = str(Path(path).expanduser().resolve())
    if len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return uri
    missing = unreachable_nodes(Path(uri))
    if missing:
        raise StorageError(
            f"train.storage_path: {uri} is local to the driver's node; Ray node(s) "
            f"{', '.join(missing)} cannot see it, so checkpoints written there would be lost "
            "to the run. Use a folder shared by every node (NFS, ...) or an s3:// URI."
        )
    return uri
