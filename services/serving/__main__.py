"""`python -m services.serving`: the service's own entry point (`mnist-pipeline serve` execs it)."""

from __future__ import annotations

import argparse

import uvicorn

from services.serving.app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.serving",
        description="Serve the registered model over HTTP (settings: SERVING_* and "
        "MLFLOW_TRACKING_URI).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
