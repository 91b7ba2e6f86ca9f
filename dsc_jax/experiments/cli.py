"""``dsc-compare`` / ``python -m dsc_jax.experiments``: rerun the paper's comparison.

    dsc-compare --preset cpu_embedded                  # DSC, MoE, MoLoRA, Dense × 3 seeds
    dsc-compare --preset cpu_wikitext --seeds 0,1,2
    dsc-compare --preset tiny --ablation top_k         # K ∈ {2,4,8,16} at fixed M
    dsc-compare --preset cpu_embedded --ablation router  # flat vs product keys, M ≤ 65,536
    dsc-compare --preset paper                         # spec §7 on an accelerator

Runs go to ``<results>/<study>/<variant>_seed<k>/``; rerunning skips finished runs and
resumes interrupted ones; the report (comparison.md/.json, convergence.png, dsc_bank.png)
is rewritten at the end (``--report-only``: without training).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from dsc_jax.experiments import report, runner
from dsc_jax.experiments.presets import STUDIES


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dsc-compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", required=True, choices=tuple(STUDIES))
    p.add_argument("--results", default="results", help="results root folder")
    p.add_argument(
        "--study",
        default=None,
        help="study folder name (default: the preset's, plus _<ablation> for an ablation)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of dsc,moe,molora,dense (default: the preset's)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: preset's)")
    p.add_argument("--steps", type=int, default=None, help="override num_train_steps")
    p.add_argument(
        "--ablation",
        default="none",
        choices=runner.ABLATIONS,
        help="DSC ablation axis instead of the method comparison",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base-config key, e.g. --set optim.learning_rate=2e-3",
    )
    p.add_argument("--latency-rounds", type=int, default=30)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--report-only", action="store_true", help="write the report, train nothing")
    p.add_argument("--plan", action="store_true", help="print the runs and their sizes, exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    study = runner.resolve_study(args.preset)
    if args.ablation == "none":
        methods = args.methods.split(",") if args.methods else list(study.methods)
        variants = runner.method_variants(methods)
    else:
        variants = runner.ablation_variants(args.ablation)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(study.seeds)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    name = args.study or (study.name + ("" if args.ablation == "none" else f"_{args.ablation}"))
    folder = os.path.join(args.results, name)
    os.makedirs(folder, exist_ok=True)
    runs = runner.plan(study, folder, variants, seeds, args.steps, overrides)
    for v in variants:
        r = next(run for run in runs if run.variant == v)
        print(
            f"[dsc-compare] {v.name}: {r.sizes['ffn']} | total "
            f"{r.sizes['total_params']:,} active {r.sizes['active_params']:,}",
            flush=True,
        )
    if args.plan:
        return 0
    command = "dsc-compare " + shlex.join(argv)
    with open(os.path.join(folder, "commands.txt"), "a") as f:
        f.write(command + "\n")
    counts = {}
    if not args.report_only:
        counts = runner.execute(runs, log=lambda m: print(m, flush=True))
        if counts["interrupted"]:
            print("[dsc-compare] sweep interrupted; rerun the same command to resume")
    latency = {} if args.no_latency else report.measure_latency(runs, args.latency_rounds)
    summary = report.aggregate(runs, latency)
    title = f"{name} ({args.preset})"
    written = report.write_report(
        summary,
        folder,
        title,
        command,
        study.description,
        extra={
            "seeds": seeds,
            "counts": counts,
            "overrides": overrides,
            "steps": runs[0].config.num_train_steps,
            "latency_rounds": args.latency_rounds,
        },
    )
    with open(written[0]) as f:
        print(f.read(), flush=True)
    print("[dsc-compare] wrote " + ", ".join(written), flush=True)
    return 0


def run() -> None:
    """Console-script entry point: errors are one ``dsc-compare: error:`` line, exit 1."""
    from dsc_jax._storage import StorageError, error_line
    from dsc_jax.train.checkpointing import CheckpointWriteError, UnreadableCheckpointsError
    from dsc_jax.train.trainer import DataSetupError, Interrupted, NonFiniteLossError
    from dsc_jax.train.workdir import WorkdirError

    user_errors = (
        ValueError,
        WorkdirError,  # a run folder locked, unwritable, or a second sweep on the folder
        StorageError,
        DataSetupError,
        NonFiniteLossError,
        UnreadableCheckpointsError,
        CheckpointWriteError,
    )
    try:
        status = main()
    except user_errors as err:
        sys.exit(f"dsc-compare: error: {err}")
    except OSError as err:
        sys.exit(f"dsc-compare: error: {error_line(err)}")
    except KeyboardInterrupt as err:
        status = err.exit_status if isinstance(err, Interrupted) else 130
        print("\ndsc-compare: interrupted; rerun the same command to resume.", file=sys.stderr)
        sys.exit(status)
    sys.exit(status)
