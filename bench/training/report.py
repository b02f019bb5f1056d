"""The training benchmark's targets and markdown (the method is in bench/README.md)."""

from typing import Any

from bench.report import header, table, target

TARGET_LIGHTNING = 1.05  # Lightning per-epoch / reference per-epoch
TARGET_RAY_ONE = 1.10  # Ray Train, 1 worker, per-epoch / reference
TARGET_FIXED_S = 15.0  # Ray Train's fixed overhead: these phases
RAY_FIXED_PHASES = ("ray start", "worker group start", "worker group end", "ray shutdown")
TARGET_CNN_GEMM = 0.30  # CNN training FLOP/s / the machine's float32 GEMM FLOP/s
COLUMNS = (
    "path={path} | workers x threads={threads} | s/epoch={epoch_s:.2f} | x ref={ratio:.3f} | "
    "images/s={images_per_s:,.0f} | GFLOP/s={gflops:.1f} | % GEMM={gemm_fraction:.1%} | "
    "fixed s={fixed_overhead_s:.1f} | other CPU={other_cpu_pct:.0f}%"
)
PHASE_EXTRAS = {  # the rows under a Ray run's phases
    "ray_fixed_s": "Ray fixed overhead (start, worker group start and end, shutdown)",
    "imports_s": "imports in the fresh process",
    "mlflow_s": "MLflow (driver calls, per-epoch logging, metrics thread CPU)",
}


def versus(row: dict[str, Any]) -> str:
    return f"{row['epoch_s']:.2f} vs {row['reference_epoch_s']:.2f} s = {row['ratio']:.3f}x"


def model_targets(model: str, rows: list[dict[str, Any]], default: str) -> list[dict[str, Any]]:
    paths, found = {r["path"]: r for r in rows if r["model"] == model}, []
    if lit := paths.get("lightning"):
        what = f"{model}: lightning per epoch <= {TARGET_LIGHTNING}x the plain loop"
        found.append(target(what, versus(lit), lit["ratio"] <= TARGET_LIGHTNING, lit["ratio"]))
    ones = [r for path, r in paths.items() if path.startswith("ray 1x")]
    for one in ones:
        what = f"{model}: {one['path']} per epoch <= {TARGET_RAY_ONE}x the plain loop"
        found.append(target(what, versus(one), one["ratio"] <= TARGET_RAY_ONE, one["ratio"]))
        fixed, phases = one["ray_fixed_s"], ", ".join(RAY_FIXED_PHASES)
        what = f"{model}: {one['path']} fixed overhead ({phases}) <= {TARGET_FIXED_S:g} s"
        measured = f"{fixed:.1f} s (all outside the epochs {one['fixed_overhead_s']:.1f} s)"
        found.append(target(what, measured, fixed <= TARGET_FIXED_S, fixed))
    if model == "cnn" and (row := paths.get(default) or paths.get("lightning")):
        what, share = f"cnn: {row['path']} >= {TARGET_CNN_GEMM:.0%} of GEMM", row["gemm_fraction"]
        measured = f"{row['gflops']:.1f} GFLOP/s = {share:.1%}"
        found.append(target(what, measured, share >= TARGET_CNN_GEMM, share))
    return found


def phase_table(ray_rows: list[dict[str, Any]]) -> list[str]:
    phases = [(k, [r["phases_s"][k] for r in ray_rows]) for k in ray_rows[0]["phases_s"]]
    phases += [(label, [r[key] for r in ray_rows]) for key, label in PHASE_EXTRAS.items()]
    columns = ["phase={phase}", *(f"{r['path']}={{s[{i}]:.2f}}" for i, r in enumerate(ray_rows))]
    return table([{"phase": k, "s": v} for k, v in phases], " | ".join(columns))


def model_section(work: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    w, mib, ray_rows = work, work["parameters"] * 4 / 2**20, [r for r in rows if "phases_s" in r]
    line = (
        f"{w['train_images']:,} training and {w['val_images']:,} validation images, batch "
        f"{w['batch_size']}, augmentation {'on' if w['augment'] else 'off'}, {w['epochs']} epochs; "
        f"{w['train_flops'] / 1e6:.1f} MFLOP per training image, {w['val_flops'] / 1e6:.1f} per "
        f"validation image. Two workers all-reduce {w['parameters']:,} gradients ({mib:.1f} MiB) "
        f"a step: {w['allreduce_ms']:.2f} ms between two idle gloo processes, "
        f"{w['allreduce_s_per_epoch']:.2f} s per epoch at the least.\n"
    )
    phases = phase_table(ray_rows) if ray_rows else []
    return [f"## {w['model'].upper()}\n", line, *table(rows, COLUMNS), *phases]


def markdown(report: dict[str, Any]) -> list[str]:
    env, gemm = report["environment"], report["gemm_gflops"]
    title = "Training benchmark: the project's paths vs a plain PyTorch loop"
    parts = [header(title, "bench.training.run", report)]
    parts.append(
        f"GEMM ceiling (float32 `torch.mm` 2048², {env['torch_threads']} threads, the best of "
        f"samples {', '.join(f'{g:.1f}' for g in gemm)}): {max(gemm):.1f} GFLOP/s. Every path ran "
        f"with the malloc settings {env['malloc_env'] or 'of glibc (its defaults)'}.\n"
    )
    for model, work in report["models"].items():
        parts += model_section(work, [r for r in report["rows"] if r["model"] == model])
    return parts
