"""MetaSchedule tuning of a fused Relax module, with a JSON database directory that later builds reuse.

    tune(fused_mod, target, trials, database_dir) -> TuneReport

`fused_mod` is the module as `arq_deploy.targets.tvm_build` has it right before scheduling (legalized, fused, one
PrimFunc per fused operator), so that the workloads tuned here are exactly the ones the build looks up
(`MetaScheduleApplyDatabase` keys a record by the structural hash of the normalised PrimFunc).

Reuse: a task (one distinct PrimFunc, weighted by how often the model calls it) whose workload is already in the
database was tuned before and is not tuned again (its records, if any, are applied); only the others share the trial
budget. So building the same model twice with the same database directory runs no new trials the second time, and a
database tuned for one model serves every build whose fused functions are structurally identical. To spend more
trials on a model, tune into a fresh directory.

Baselines: before searching, each task's no-tuning arq schedule (passed in as `baseline`) is measured and stored as a
record, so a tuned build is never slower than an untuned one by more than measurement noise, and MetaSchedule's
evolutionary search starts from it. With a budget smaller than the number of tasks, only that many baselines run.

Measuring: candidates run on this machine (`LocalRunner`), so tuning is for the host CPU only. Candidates are built
in-process (`make_inprocess_builder`): MetaSchedule's LocalBuilder starts a fresh worker process per round, and each
imports TVM (and torch through tvm-ffi) and TVM's tensor intrinsics, which took minutes per round on this shared
2-core machine; `builder="local"` uses it with a 300 s timeout and one worker. The search population is scaled to the
budget (`search_strategy`). Needs psutil, cloudpickle and xgboost.

The database directory holds MetaSchedule's `database_workload.json` and `database_tuning_record.json` (append-only
JSON lines) and `logs/`.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from arq_deploy.core.errors import ArqError

BUILDER_TIMEOUT_S = 300
TRIALS_PER_ITER = 16


@dataclass(frozen=True)
class TuneReport:
    """What one `tune` call did: tasks in the module, tasks tuned now, tasks served from the database, trials run."""

    database: str
    tasks: int
    tuned: int
    reused: int
    trials_requested: int
    trials_run: int
    records: int  # records in the database afterwards

    def to_json(self) -> dict:
        return asdict(self)


def check_trials(trials) -> int:
    """The trial budget as an int >= 0, else ArqError."""
    import operator

    try:
        n = operator.index(trials)
    except TypeError:
        raise ArqError(f"tune trials must be an integer >= 0, got {trials!r}") from None
    if n < 0:
        raise ArqError(f"tune trials must be an integer >= 0, got {trials}")
    return n


def open_database(database_dir: str | os.PathLike, create: bool = True):
    """MetaSchedule's JSONDatabase in `database_dir` (created when missing and `create`); ArqError when unusable."""
    from tvm.s_tir import meta_schedule as ms

    d = Path(database_dir)
    if d.exists() and not d.is_dir():
        raise ArqError(f"tuning database {d} is a file; give a directory")
    if not d.exists():
        if not create:
            raise ArqError(f"tuning database {d} does not exist")
        d.mkdir(parents=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(d), module_equality="structural")
    except Exception as e:  # malformed JSON lines, unreadable files
        raise ArqError(f"tuning database {d} cannot be read ({type(e).__name__}): delete it or give another "
                       f"directory") from None


def extract_tasks(fused_mod, target):
    """MetaSchedule tasks of every unscheduled PrimFunc in `fused_mod` (weight = calls from the Relax functions)."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused_mod, target)
    return [t for t in tasks if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)]


def covered(db, task) -> bool:
    """True when the task's workload is in the database: it was tuned before (with whatever budget it got), so its
    records, if any, are reused and no new trials are spent on it."""
    return bool(db.has_workload(task.dispatched[0]))


def tune(fused_mod, target, trials: int, database_dir: str | os.PathLike, *, seed: int = 0,
         quiet: bool = True, builder: str = "inprocess", baseline=None) -> TuneReport:
    """Tune the fused module's tasks that the database lacks with `trials` trials in all (baselines included).

    trials: global budget (>= 0; 0 only reports what the database already covers). Tasks are scheduled by
        MetaSchedule's gradient task scheduler; every task gets at least one round of
        max(1, min(16, trials // tasks)) candidates while the budget lasts.
    builder: "inprocess" (`InProcessBuilder`) or "local" (MetaSchedule's LocalBuilder, one fresh worker process per
        round, timeout 300 s).
    baseline: optional `f(IRModule) -> tvm.s_tir.Schedule | None`, a no-tuning schedule (the arq rules). Each task's
        baseline is measured first and stored as a record, so the database's best is never slower than it and the
        evolutionary search starts from it; its measurements count as trials.
    Returns a TuneReport; the records are in `database_dir` (see the module docstring).
    """
    import tvm

    trials = check_trials(trials)
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    db = open_database(database_dir)
    before = len(db)
    tasks = extract_tasks(fused_mod, tgt)
    todo = [t for t in tasks if not covered(db, t)]
    if trials > 0 and todo:
        _run(todo, tgt, trials, db, str(database_dir), seed, quiet, builder, baseline)
        for t in todo:  # mark every task as tuned, also those the budget ran out before
            db.commit_workload(t.dispatched[0])
    after = len(db)
    return TuneReport(database=str(Path(database_dir)), tasks=len(tasks), tuned=len(todo) if trials > 0 else 0,
                      reused=len(tasks) - len(todo), trials_requested=trials, trials_run=after - before,
                      records=after)


def _run(tasks, tgt, trials, db, work_dir, seed, quiet, builder, baseline):
    with _quiet(quiet):
        try:
            _tune(tasks, tgt, trials, db, work_dir, seed, builder, baseline)
        except ImportError as e:
            raise ArqError(f"MetaSchedule tuning needs {e.name or 'a missing package'}: pip install psutil "
                           f"cloudpickle xgboost") from None


def _tune(tasks, tgt, trials, db, work_dir, seed, builder, baseline):
    from tvm.s_tir import meta_schedule as ms

    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=work_dir, strategy=search_strategy(trials),
        num_threads=int(tgt.attrs.get("num-cores", 0) or os.cpu_count() or 1), seed=seed)
    if builder == "inprocess":
        b = make_inprocess_builder()
    elif builder == "local":
        b = ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_S, max_workers=1)
    else:
        raise ValueError(f"builder must be 'inprocess' or 'local', got {builder!r}")
    runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50))
    if baseline is not None:
        trials -= _seed_baselines(tasks[:trials], tgt, db, b, runner, baseline)
    if trials <= 0:
        return
    ms.tune_tasks(tasks=ctxs, task_weights=[float(w) for w in weights], work_dir=work_dir,
                  max_trials_global=trials, max_trials_per_task=trials,
                  num_trials_per_iter=max(1, min(TRIALS_PER_ITER, trials // max(1, len(ctxs)))),
                  builder=b, runner=runner, database=db, cost_model="xgb", task_scheduler="gradient")


def _seed_baselines(tasks, tgt, db, builder, runner, baseline) -> int:
    """Measure `baseline`'s schedule of every task and commit it as a tuning record; returns how many ran."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    n = 0
    for task in tasks:
        mod = task.dispatched[0]
        try:
            sch = baseline(mod)
        except Exception:  # noqa: BLE001 - no baseline for this function: MetaSchedule starts from scratch
            sch = None
        if sch is None:
            continue
        built = builder.build([BuilderInput(sch.mod, tgt)])[0]
        if built.error_msg is not None:
            continue
        args = ArgInfo.from_prim_func(mod["main"])
        res = runner.run([RunnerInput(built.artifact_path, "cpu", args)])[0].result()
        n += 1
        if res.error_msg is None and res.run_secs:
            db.commit_tuning_record(TuningRecord(sch.trace, db.commit_workload(mod), res.run_secs, tgt, args))
    return n


def search_strategy(trials: int):
    """MetaSchedule's evolutionary search, its population scaled to the budget (default 512 candidates per round,
    which costs minutes per round on 2 cores even when only a few trials are asked for)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 2 * trials)),
                                                 init_min_unmeasured=min(50, max(16, trials // 4)),
                                                 genetic_num_iters=4 if trials >= 256 else 2)


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Silence MetaSchedule's console output (its logs still go to DATABASE/logs)."""
    import logging

    if not quiet:
        yield
        return
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def make_inprocess_builder():
    """A MetaSchedule builder that compiles candidates in this process.

    MetaSchedule's LocalBuilder starts a fresh worker process for every round of candidates (a workaround for a
    worker memory leak); each one imports TVM and its tensor intrinsics, which took minutes per round on this loaded
    2-core machine. Building a TIR PrimFunc in-process takes well under a second. A candidate that fails to build
    becomes an error result, as in LocalBuilder; there is no timeout.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    with warnings.catch_warnings():  # default_build calls the deprecated tvm.build
                        warnings.simplefilter("ignore", DeprecationWarning)
                        path = default_export(default_build(bi.mod, bi.target, None))
                    results.append(BuilderResult(path, None))
                except Exception as e:  # noqa: BLE001 - a failing candidate is a result, not an error
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


@contextlib.contextmanager
def database_dir(path: str | os.PathLike | None):
    """Yield the tuning database directory: `path` itself, or a temporary one removed afterwards when None."""
    if path is not None:
        yield Path(path)
        return
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="arq-tuning-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
