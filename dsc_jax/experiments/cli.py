"""``dsc-compare`` / ``python -m dsc_jax.experiments``: rerun the paper's comparison.

    dsc-compare --preset cpu_embedded                  # DSC, MoE, MoLoRA, Dense × 3 seeds
    dsc-compare --preset cpu_wikitext --seeds 0,1,2
    dsc-compare --preset tiny --ablation top_k         # K ∈ {2,4,8,16} at fixed M
    dsc-compare --preset cpu_embedded --ablation router  # flat vs product keys, M ≤ 65,536
    dsc-compare --preset paper                         # the paper's setting (accelerator)

Runs go to ``<results>/<study>/<variant>_seed<k>/``; rerunning skips finished runs and
resumes interrupted ones; the report (comparison.md/.json, convergence.png, dsc_bank.png)
is rewritten at the end (``--report-only``: without training). ``--plan`` prints each
variant's effective FFN and parameter counts and what each run would do (train, resume,
skip as finished, or refuse: finished with other settings), then exits.

``--set KEY=VALUE`` (JSON values; plain text is a string) sets any key of the study's base
config. FFN fields name the kind, as a sweep trains several (each run's config holds its
own kind's group as ``model.ffn``): ``--set model.dsc.top_k=8`` keeps K=8 in the DSC runs
and solves M and H for it, ``--set model.dsc.tau=5`` is applied as given (see
:mod:`dsc_jax.experiments.runner`). Settings that would not take effect are refused with
one ``dsc-compare: error:`` line and exit status 2: ``seed``/``name``/``model.ffn`` (use
``--seeds``/``--study``/``--methods``), a key an ablation variant sets itself, an FFN group
of a kind the sweep does not train, a key no run reads, unknown keys and bad values; so
are an option given twice, a method or seed named twice, ``--methods`` with ``--ablation``
and ``--latency-rounds`` with ``--no-latency``.
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
from dsc_jax.train.workdir import WorkdirError

LATENCY_ROUNDS = 30


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class _Once(argparse.Action):
    """A single-valued option given twice is an error (argparse would keep the last)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, f"_given_{self.dest}", False):
            parser.error(f"{option_string} given twice; give it once.")
        setattr(namespace, f"_given_{self.dest}", True)
        setattr(namespace, self.dest, values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dsc-compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.register("action", "once", _Once)
    p.add_argument("--preset", action="once", required=True, choices=tuple(STUDIES))
    p.add_argument("--results", action="once", default="results", help="results root folder")
    p.add_argument(
        "--study",
        action="once",
        default=None,
        help="study folder name (default: the preset's, plus _<ablation> for an ablation)",
    )
    p.add_argument(
        "--methods",
        action="once",
        default=None,
        help="comma-separated subset of dsc,moe,molora,dense (default: the preset's)",
    )
    p.add_argument(
        "--variants",
        action="once",
        default=None,
        help="comma-separated subset of the ablation's variants (default: all of them)",
    )
    p.add_argument(
        "--seeds", action="once", default=None, help="comma-separated seeds (default: preset's)"
    )
    p.add_argument(
        "--steps", action="once", type=int, default=None, help="override num_train_steps"
    )
    p.add_argument(
        "--ablation",
        action="once",
        default="none",
        choices=runner.ABLATIONS,
        help="DSC ablation axis instead of the method comparison",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a base-config key (FFN fields too; sizes are kept and the rest solved), "
        "e.g. --set optim.learning_rate=2e-3 --set model.dsc.top_k=8",
    )
    p.add_argument(
        "--latency-rounds",
        action="once",
        type=int,
        default=None,
        help=f"timed rounds of the latency measurement (default {LATENCY_ROUNDS})",
    )
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--report-only", action="store_true", help="write the report, train nothing")
    p.add_argument("--plan", action="store_true", help="print the runs and their sizes, exit")
    return p.parse_args(argv)


def _error(message: object) -> int:
    print(f"dsc-compare: error: {message}", file=sys.stderr, flush=True)
    return 2


def parse_settings(items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings as ``{key: value}`` (values parsed as JSON, else strings).

    Raises:
      ValueError: an item without ``=``, or a key given twice with different values.
    """
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        value = _value(text)
        if key in out and out[key] != value:
            raise ValueError(f"--set {key} given twice ({out[key]!r} and {value!r}); give it once.")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    study = runner.resolve_study(args.preset)
    name = args.study or (study.name + ("" if args.ablation == "none" else f"_{args.ablation}"))
    folder = os.path.join(args.results, name)
    try:
        if args.ablation == "none":
            methods = args.methods.split(",") if args.methods else list(study.methods)
            variants = runner.method_variants(methods)
        elif args.methods:
            raise ValueError(f"--methods {args.methods} with --ablation: ablations train DSC.")
        else:
            variants = runner.ablation_variants(args.ablation)
        if args.variants:
            variants = runner.select_variants(variants, args.variants.split(","))
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(study.seeds)
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"--seeds {args.seeds!r} names a seed twice; give each once.")
        if args.no_latency and args.latency_rounds is not None:
            raise ValueError("--latency-rounds with --no-latency: no latency is measured.")
        overrides = parse_settings(args.set)
        runs = runner.plan(study, folder, variants, seeds, args.steps, overrides)
    except ValueError as err:
        return _error(err)
    lines = [runner.describe(next(r for r in runs if r.variant == v)) for v in variants]
    for line in lines:
        print(f"[dsc-compare] {line}", flush=True)
    for key, value in overrides.items():
        readers = sorted({r.variant.name for r in runs if key in r.settings})
        print(f"[dsc-compare] --set {key}={value!r}: read by {', '.join(readers)}", flush=True)
    try:
        states = [(run, *runner.run_state(run)) for run in runs]
    except WorkdirError as err:  # an unreadable config.json of a finished run
        return _error(err)
    if args.plan:
        for run, state, detail in states:
            print(f"[dsc-compare] {run.workdir}: {detail or state}", flush=True)
    conflicts = [(run, detail) for run, state, detail in states if state == "conflict"]
    if conflicts:  # training would stop there; a report would claim settings it never used
        run, detail = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        return _error(f"{run.workdir} {detail}{more}; use another --results folder or --study.")
    if args.plan:
        return 0
    os.makedirs(folder, exist_ok=True)
    command = "dsc-compare " + shlex.join(argv)
    with open(os.path.join(folder, "commands.txt"), "a") as f:
        f.write(command + "\n" + "".join(f"#   {line}\n" for line in lines))
    counts = {}
    if not args.report_only:
        counts = runner.execute(runs, log=lambda m: print(m, flush=True))
        if counts["interrupted"]:
            print("[dsc-compare] sweep interrupted; rerun the same command to resume")
    rounds = LATENCY_ROUNDS if args.latency_rounds is None else args.latency_rounds
    latency = {} if args.no_latency else report.measure_latency(runs, rounds)
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
            "latency_rounds": rounds,
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
