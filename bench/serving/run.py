"""Serving benchmark: `python -m pipeline serve` against `mlflow models serve`."""

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench import common
from bench.report import write
from bench.serving import load
from bench.serving.report import markdown, targets

BIN, LOCAL = Path(sys.executable).parent, "http://127.0.0.1:"


def prepare_data(root: Path, train_limit: int) -> Any:
    from testkit.data import fetch_and_prepare, params_under

    overrides = {"prepare.train_limit": train_limit, "prepare.val_size": 1000}
    overrides |= {"prepare.test_limit": 2000, "train.cnn.epochs": 1, "train.cnn.augment": False}
    params = params_under(root, overrides | {"train.cnn.net.channels": [16, 32, 64]})
    fetch_and_prepare(params)
    return params


class Server(NamedTuple):
    name: str
    kind: str  # ours | mlflow: which payloads it takes
    command: list[str]
    env: dict[str, str]
    ready: str  # its readiness URL
    predict: str


def servers(model_uri: str, variant: str, workdir: Path) -> list[Server]:
    """Ours, ours with the `variant`'s SERVING_KEY=VALUE (unless "none"), MLflow's."""
    from testkit.processes import free_port

    key, _, value = variant.partition("=")
    base = {"SERVING_MODEL_URI": model_uri, "SERVING_CACHE_DIR": str(workdir / "cache")}
    ours = {"ours": base}
    if variant != "none":
        if not (key.startswith("SERVING_") and value):
            raise SystemExit(f"--variant expects SERVING_KEY=VALUE or none, got {variant!r}")
        ours[f"ours {key.removeprefix('SERVING_').lower()}={value}"] = base | {key: value}
    found, ports = [], [free_port() for _ in range(len(ours) + 1)]
    for (name, env), port in zip(ours.items(), ports, strict=False):
        url = LOCAL + str(port)
        serve = [sys.executable, "-m", "pipeline", "serve", "--port", str(port)]
        found.append(Server(name, "ours", serve, env, f"{url}/health/ready", f"{url}/v1/predict"))
    command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(ports[-1]), "-w", "1"]
    url = LOCAL + str(ports[-1])
    return [*found, Server("mlflow", "mlflow", command, {}, f"{url}/ping", f"{url}/invocations")]


def agreement(ours: str, mlflow: str, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import httpx

    with httpx.Client(timeout=60) as http:
        mine = http.post(ours, json={"images": images[:256].tolist()}).raise_for_status()
        theirs = http.post(mlflow, json={"inputs": images[:256].tolist()}).raise_for_status()
    ours_p = np.asarray([p["probabilities"] for p in mine.json()["predictions"]])
    theirs_p = np.asarray(theirs.json()["predictions"])
    found = {"images": len(ours_p), "max_abs_prob_diff": float(np.abs(ours_p - theirs_p).max())}
    found["digits_agree"] = float((ours_p.argmax(1) == theirs_p.argmax(1)).mean())
    return found | {"accuracy": float((ours_p.argmax(1) == labels[: len(ours_p)]).mean())}


def load_servers(args: argparse.Namespace, live: list[tuple[Server, int]], bodies: Any) -> list:
    """Each scenario on each server in turn (a warm-up first); concurrency 0: the open loop."""
    plan = [(f"single c={c}", 1, int(c)) for c in args.concurrency.split(",") if c]
    plan += [(f"batch 64 c={c}", 64, int(c)) for c in args.batch_concurrency.split(",") if c]
    plan.append((f"open {args.rate:g} req/s", 1, 0))
    results = []
    for (server, pid), (scenario, images, concurrency) in ((s, p) for s in live for p in plan):
        url, sent = server.predict, bodies[server.kind]["single" if images == 1 else "batch"]
        asyncio.run(load.drive(url, sent, args.warmup, concurrency, args.rate))
        seconds = args.duration if concurrency else args.rate_duration
        measured = load.measure(pid, load.drive(url, sent, seconds, concurrency, args.rate), images)
        rate = None if concurrency else args.rate
        results.append({"server": server.name, "scenario": scenario, "rate": rate} | measured)
        common.log(f"{server.name} {scenario}: {measured['req_per_s']:.1f} req/s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    add = parser.add_argument
    add("--duration", type=float, default=10.0, help="seconds per closed loop (10)")
    add("--warmup", type=float, default=2.0, help="seconds of each load before measuring (2)")
    add("--concurrency", default="1,16,64", help="single-image closed loops (1,16,64)")
    add("--batch-concurrency", default="1,4", help="closed loops of 64-image batches (1,4)")
    add("--rate", type=float, default=200.0, help="open-loop requests/s (200)")
    add("--rate-duration", type=float, default=15.0, help="seconds of the open loop (15)")
    add("--train-limit", type=int, default=20000, help="training images of a new model")
    add("--variant", default="SERVING_BATCH_MAX_WAIT_MS=2", help="ours with KEY=VALUE too, or none")
    add("--no-pin", action="store_true", help="no pinning of client and servers to CPUs")
    args = parser.parse_args(argv)
    from pipeline.data.prepared import open_prepared
    from testkit.processes import running
    from testkit.registry import champion

    report, workdir = common.begin("serving", args, argv)
    params = prepare_data(workdir / "data", args.train_limit)
    model_uri = f"models:/{params.mlflow.registered_model}@champion"
    tracking_uri, _ = champion(params, workdir)  # trains and registers it
    test = open_prepared(Path(params.paths.prepared)).load("test")
    images, cpus = test.images.astype(np.float32) / 255.0, sorted(os.sched_getaffinity(0))
    pinned = not args.no_pin and len(cpus) > 1
    # The servers find the store through MLFLOW_TRACKING_URI, and uvicorn on PATH (mlflow).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "MLFLOW_"))}
    env |= {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}
    plan, pin = servers(model_uri, args.variant, workdir), set(cpus[1:]) if pinned else None
    ours = [s.name for s in plan if s.kind == "ours"]
    report |= {"model_uri": model_uri, "ours": ours, "pinned": pinned}
    with contextlib.ExitStack() as stack:
        live = []
        for index, server in enumerate(plan):  # one at a time: the first fills the ONNX cache
            log, command = workdir / f"server-{index}.log", server.command
            process = running(
                command, server.ready, log, env | server.env, 300, cpus=pin, group=True
            )
            live.append((server, stack.enter_context(process).pid))
        if pinned:  # the client on the first CPU, every server on the others
            os.sched_setaffinity(0, {cpus[0]})
        report["agreement"] = agreement(plan[0].predict, plan[-1].predict, images, test.labels)
        report["results"] = load_servers(args, live, load.payloads(images, 64))
    report["targets"] = targets(report["results"], ours)
    report["config"] = vars(args)
    report["notes"] = common.disturbed(report["results"], "server", "scenario")
    write("serving", report, markdown(report), args.out_dir)
    common.finish(args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
