"""The serving benchmark's targets and markdown (the method is in bench/README.md)."""

from typing import Any

from bench.report import header, table, target

TARGET_RATIO = 2.0  # our throughput / MLflow's, single images at concurrency 16
TARGET_P99_MS = 10.0  # our p99 at the open-loop rate
COLUMNS = (
    "server={server} | scenario={scenario} | req/s={req_per_s:,.1f} | images/s={images_per_s:,.0f}"
    " | p50 ms={p50_ms:.2f} | p90 ms={p90_ms:.2f} | p99 ms={p99_ms:.2f} | max ms={max_ms:.1f} | "
    "server CPU={server_cpu_pct:.0f}% | req per server CPU-s={req_per_server_cpu_s:,.0f} | "
    "client CPU={client_cpu_pct:.0f}% | other CPU={other_cpu_pct:.0f}% | errors={errors:d}"
)


def targets(results: list[dict[str, Any]], ours: list[str]) -> list[dict[str, Any]]:
    """Per variant of ours: throughput against MLflow's at c=16, p99 in the open loop."""
    found, checks = {(r["server"], r["scenario"]): r for r in results}, []
    theirs, rate = found.get(("mlflow", "single c=16")), results[-1]["scenario"]
    for name in ours:
        mine, opened = found.get((name, "single c=16")), found.get((name, rate))
        if mine and theirs:
            ratio, cpu = mine["req_per_s"] / theirs["req_per_s"], mine["server_cpu_pct"]
            measured = f"{mine['req_per_s']:,.0f} vs {theirs['req_per_s']:,.0f} req/s = "
            measured += f"{ratio:.2f}x (server CPU {cpu:.0f}% vs {theirs['server_cpu_pct']:.0f}%)"
            what = f"`{name}` throughput >= {TARGET_RATIO:g}x mlflow (single images, c=16)"
            checks.append(target(what, measured, ratio >= TARGET_RATIO, ratio))
        if opened:  # and the rate sustained, without errors
            sustained = opened["errors"] == 0 and opened["req_per_s"] >= 0.97 * opened["rate"]
            measured = f"p99 {opened['p99_ms']:.2f} ms, {opened['req_per_s']:.1f} req/s, "
            measured += f"{opened['errors']} errors"
            holds = sustained and opened["p99_ms"] <= TARGET_P99_MS
            what = f"`{name}` p99 <= {TARGET_P99_MS:g} ms at {rate}, sustained, no errors"
            checks.append(target(what, measured, holds, opened["p99_ms"]))
    return checks


def markdown(report: dict[str, Any]) -> list[str]:
    config, agreed = report["config"], report["agreement"]
    title = "Serving benchmark: ours vs `mlflow models serve`"
    pinning = "the client on CPU 0, the servers on the others" if report["pinned"] else "no pinning"
    setup = (
        f"Model `{report['model_uri']}`; {pinning}. Closed loops: {config['warmup']:g} s warm-up, "
        f"{config['duration']:g} s measured; open loop: {config['rate']:g} requests/s for "
        f"{config['rate_duration']:g} s. Agreement on {agreed['images']} test images: "
        f"{agreed['digits_agree']:.1%} of the digits, probabilities within "
        f"{agreed['max_abs_prob_diff']:.1e}, accuracy {agreed['accuracy']:.1%}.\n"
    )
    return [header(title, "bench.serving.run", report), setup, *table(report["results"], COLUMNS)]
