"""Stage: a sweep. Several evaluation runs in one process (``main.py --runs``, what ``eval_all.sh`` runs).

Each run's flags go on top of the shared ones; every run is checked before the first model loads
(:func:`utils.evaluation.prepare`), the base model, the pool and the retriever load once for all runs
(:class:`utils.session.Session`), and before each run the sweep logs its place and an estimate of the time left,
from the pace of the runs so far (:class:`SweepPace`).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from utils.evaluation import Plan, execute, prepare

logger = logging.getLogger(__name__)

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def sweep_runs(args: argparse.Namespace, build_parser) -> list[tuple[str, argparse.Namespace]]:
    """The runs of ``--runs "NAME FLAGS..." ...``: each run's flags on top of the shared ones, results in --res_dir/NAME.json.

    ``build_parser()`` gives the entry's parser, which parses each run's own flags.
    """
    import shlex

    from utils.data import InputError

    if args.res_path:
        raise InputError("--res_path names one run's file; with --runs give --res_dir instead (each run writes <res_dir>/<name>.json).")
    if not args.res_dir:
        raise InputError("--runs needs --res_dir, the folder of the runs' results files, e.g. --res_dir results/embedded")
    shared = {k: v for k, v in vars(args).items() if k not in ("runs", "res_dir", "force")}
    runs, names = [], set()
    for spec in args.runs:
        try:
            words = shlex.split(spec)
        except ValueError as err:
            raise InputError(f"--runs {spec!r}: {err}; check the quotes of this run.") from err
        if not words or not RUN_NAME.fullmatch(words[0]):
            raise InputError(f"--runs {spec!r}: start each run with its name (letters, digits, _ . -), e.g. --runs \"mixture --eval_type mixture --lora_num 3\".")
        name, flags = words[0], words[1:]
        if name in names:
            raise InputError(f"--runs names {name!r} twice; give each run its own name.")
        names.add(name)
        if any(f.split("=")[0] in ("--runs", "--res_dir", "--res_path", "--force", "--settings") for f in flags):
            raise InputError(f"--runs {name}: --runs, --res_dir, --res_path, --force and --settings apply to the whole sweep, not to one run.")
        parser = build_parser()
        parser.exit_on_error = False
        parser.set_defaults(**shared)  # the run's own flags override the shared ones
        try:
            run_args, unknown = parser.parse_known_args(flags)
        except argparse.ArgumentError as err:
            raise InputError(f"Run {name!r}: {err}.") from err
        if unknown:
            raise InputError(f"Run {name!r}: unknown flags {unknown}; see python main.py --help.")
        run_args.res_path = str(Path(args.res_dir) / f"{name}.json")
        runs.append((name, run_args))
    return runs


def run_sweep(args: argparse.Namespace, build_parser) -> list[Path]:
    """Every run of the sweep in this process, sharing the base model, the pool and the retriever.

    All runs are checked before the first model loads; a run whose results file exists is skipped unless --force.
    """
    from utils.data import InputError
    from utils.session import Session

    plans = []
    for name, run_args in sweep_runs(args, build_parser):
        if Path(run_args.res_path).exists() and not args.force:
            logger.info("%s exists; skipping %s (--force redoes it)", run_args.res_path, name)
            continue
        try:
            plans.append(prepare(run_args))
        except InputError as err:
            raise InputError(f"Run {name!r}: {err}") from err
    session = Session()
    pace = SweepPace()
    out = []
    for i, plan in enumerate(plans):
        logger.info("Sweep: run %d of %d, %s; %s", i + 1, len(plans), Path(plan.args.res_path).stem, pace.estimate(plans[i:]))
        units = work_units(plan)  # before execute(), which fills plan.done
        out.append(execute(plan, session))
        pace.record(plan, units)
    return out


def work_units(plan: Plan) -> tuple[int, int]:
    """(rows left to generate, LoraHub example-evaluations of its searches) of one run."""
    rows = len(plan.rows) - len(plan.done)
    args = plan.args
    if args.eval_type != "lorahub":
        return rows, 0
    per_scope = args.lorahub_examples * (len(plan.pool) if args.lorahub_scope == "all" else 1)
    scopes = 1 if args.lorahub_scope == "all" else len({r["task"] for r in plan.rows})
    return rows, scopes * per_scope * (args.lorahub_budget + 1)


class SweepPace:
    """Time left in a sweep, from the pace of its finished runs: seconds per generated row and per LoraHub
    example-evaluation (a search evaluates its loss on every example, budget + 1 times)."""

    def __init__(self):
        self.rows = self.row_s = self.evals = self.eval_s = 0.0

    def record(self, plan: Plan, units: tuple[int, int]) -> None:
        rows, evals = units
        self.rows += rows
        self.row_s += plan.seconds.get("generation", 0.0)
        if evals and "search" in plan.seconds:
            self.evals += evals
            self.eval_s += plan.seconds["search"]

    def estimate(self, remaining: list[Plan]) -> str:
        if not self.rows:
            return "time left estimated after the first run"
        rows = sum(work_units(p)[0] for p in remaining)
        evals = sum(work_units(p)[1] for p in remaining)
        left = rows * self.row_s / self.rows
        if evals and not self.evals:
            return f"at least {left / 60:.0f} min left (LoraHub's searches not timed yet)"
        if evals:
            left += evals * self.eval_s / self.evals
        return f"about {left / 60:.0f} min left"
