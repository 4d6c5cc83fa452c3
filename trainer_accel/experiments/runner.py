"""What `python -m trainer_accel.run` does once its flags are read: the phase or pipeline policy.

One phase: tidy its folder, decide where its weights come from (training/start.py), check every input, train
(training/loop.py), run the phase's gate when it has one, export best.pt. A pipeline: its phases in order
(phases/pipeline.py), each from the previous phase's best (weights only, optimizer fresh); started again, it
continues in the phase where it stopped, after checking the inputs of every phase still to run.

Exit codes: 0 done, 2 bad input (config, caches, checkpoint, flags; one line per problem), 3 stopped by
SIGTERM/SIGINT after writing a checkpoint, 1 anything else. `--result-json PATH` also writes them down for
orchestrators (result.py); `--plan` prints what the run would do and trains nothing (plan.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from trainer_accel.checkpoints.discovery import (
    checkpoint_phase,
    find_resume_checkpoint,
    phase_finished,
    reconcile_pointers,
    set_aside_broken,
)
from trainer_accel.checkpoints.layout import InvalidCheckpoint, model_sha256, read_meta
from trainer_accel.checkpoints.writing import sweep_leftovers
from trainer_accel.config import PhaseConfig
from trainer_accel.devices.accelerator import announce_compute, make_accelerator
from trainer_accel.devices.collective import end_process_group, main_process_decides
from trainer_accel.devices.hardware import compute_warnings
from trainer_accel.devices.ownership import own_phases
from trainer_accel.devices.stopping import Interrupted
from trainer_accel.errors import UserError, raise_if_any, report
from trainer_accel.experiments.best_pt import export_run_best
from trainer_accel.experiments.evaluation import evaluate_checkpoints, format_summary
from trainer_accel.experiments.plan import (
    assumed_flops,
    command_plans,
    format_phase_plan,
    load_configs,
    plan_problems_text,
)
from trainer_accel.experiments.result import EXIT_CODES, Outcome
from trainer_accel.hf import directory as hf_dir
from trainer_accel.overrides import Override, parse_overrides
from trainer_accel.paths import Paths, output_file_problem, resolve_paths, unwritable
from trainer_accel.phases.phase import Phase
from trainer_accel.phases.pipeline import load_pipeline
from trainer_accel.phases.registry import PIPELINE, load_config, phase_named, phase_names
from trainer_accel.training.inputs import PhaseInputs, check_phase_inputs, collect
from trainer_accel.training.loop import PhaseResult, Trainer, build_optimizer
from trainer_accel.training.start import StartPoint, model_for, resume_point, same_tokenizer, start_point

log = logging.getLogger(__name__)


def setup_logging(is_main: bool, verbose: bool = False) -> None:
    """INFO on the main process (DEBUG with -v), WARNING on the others: one process speaks for the run."""
    level = (logging.DEBUG if verbose else logging.INFO) if is_main else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if verbose
        else "%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def set_aside(phase_dir: Path) -> None:
    """--no-resume keeps what an earlier run wrote: the phase folder is renamed, never deleted."""
    if phase_dir.exists() and any(phase_dir.iterdir()):
        dest = phase_dir.with_name(f"{phase_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(phase_dir, dest)
        log.warning("--no-resume: earlier %s checkpoints moved to %s", phase_dir.name, dest)


def start_afresh(acc, paths: Paths, phases: tuple[str, ...]) -> None:
    """--no-resume, once every input of the run has been checked: a refused run moves nothing (the next plain run
    would otherwise start from scratch, its checkpoints set aside by a run that never began)."""
    if acc.is_main_process:
        for phase in phases:
            set_aside(paths.phase_dir(phase))
    acc.wait_for_everyone()


def tidy_phase_dir(acc, phase_dir: Path, auto_resume: bool) -> None:
    """Before anything reads a phase's checkpoints: clean up after killed saves and, when resuming on our own,
    set broken checkpoints aside (an explicit --resume of a broken one is an error instead)."""
    if acc.is_main_process:
        sweep_leftovers(phase_dir)
        if auto_resume:
            set_aside_broken(phase_dir)
            reconcile_pointers(phase_dir)
    acc.wait_for_everyone()


def plan_phase(
    acc, cfg: PhaseConfig, phase: Phase, paths: Paths, resume: Path | None, auto_resume: bool, init: Path | None
) -> tuple[PhaseInputs, StartPoint]:
    """Check caches and the start point together; return the inputs and what the phase starts from.

    Which checkpoint to resume from is the main process's answer; then every process loads it."""
    resume = main_process_decides(acc, lambda: resume_point(cfg, paths, resume, auto_resume, phase.starts_from_a_model))
    base = paths.config_checkpoint(cfg.adapter.base) if cfg.adapter is not None and cfg.adapter.base else None
    inputs, start = collect(lambda: check_phase_inputs(cfg, paths), lambda: start_point(cfg, resume, init, base))
    raise_if_any(same_tokenizer(start.initial, inputs.tokenizer))
    return inputs, start


def check_same_start(acc, start: StartPoint) -> None:
    """Every process must continue the same checkpoint; on several machines that needs one shared filesystem."""
    if acc.num_processes == 1:
        return
    resumed = start.resumed
    steps = acc.gather(torch.tensor([-1 if resumed is None else resumed.step], device=acc.device)).tolist()
    if len(set(steps)) > 1:
        seen = ", ".join(f"process {r}: {'no checkpoint' if s < 0 else f'step {s}'}" for r, s in enumerate(steps))
        raise UserError(
            f"the processes found different checkpoints to resume from ({seen}); the checkpoints dir "
            "must be one filesystem that every machine sees"
        )


def run_phase(
    acc, cfg: PhaseConfig, phase: Phase, paths: Paths, inputs: PhaseInputs, start: StartPoint, outcome: Outcome
) -> PhaseResult:
    check_same_start(acc, start)
    if cfg.sample_prompts:
        raise_if_any(unwritable([("samples", paths.samples)]))
    model = model_for(cfg, start)
    optimizer = build_optimizer(model, cfg.train, acc.device)
    trainer = Trainer(
        acc,
        cfg,
        phase.for_config(cfg),
        inputs.batches,
        paths,
        model,
        optimizer,
        start,
        inputs.data_info(),
        inputs.chat_format(),
    )
    outcome.started(trainer)
    result = trainer.fit()
    if phase.gate is not None:
        outcome.verdict = promotion_gate(acc, phase, paths, result, trainer.parent)
    return result


def promotion_gate(acc, phase: Phase, paths: Paths, result: PhaseResult, parent: dict | None) -> str | None:
    """The end of a gated phase: the eval summary of its best against the checkpoint it started from
    (evaluation.py, judged by the phase's gate)."""
    verdict = None
    if acc.is_main_process:
        baseline = Path(parent["checkpoint"]) if parent and parent.get("relation") == "initialised" else None
        if baseline is None or not baseline.exists() or not same_weights(baseline, parent.get("model_sha256")):
            log.warning(
                "%s: the checkpoint it started from is not there to compare with%s; no eval summary, not deployable",
                phase.name,
                f" ({baseline} is gone or holds other weights now)" if baseline else "",
            )
        else:
            candidate = result.best_dir or result.latest_dir
            summary = evaluate_checkpoints(paths, candidate, baseline, None, acc.device)
            verdict = summary["verdict"]
            log.info("eval summary of %s against %s:\n%s", candidate, baseline, format_summary(summary))
    acc.wait_for_everyone()
    return verdict


def same_weights(checkpoint: Path, weights_sha256: str | None) -> bool:
    """Whether a checkpoint still holds the weights a run recorded (a .pt or an old record: not checkable, trusted)."""
    if weights_sha256 is None or not checkpoint.is_dir():
        return True
    if hf_dir.is_hf_dir(checkpoint):
        return hf_dir.weights_sha256(checkpoint) == weights_sha256
    try:
        return model_sha256(read_meta(checkpoint, verify=False)) == weights_sha256
    except InvalidCheckpoint:
        return False


def export_at_end(acc, phase: Phase, result: PhaseResult, paths: Paths, outcome: Outcome) -> None:
    if acc.is_main_process:
        source = result.best_dir or result.latest_dir
        record = export_run_best(source, paths)
        outcome.best_pt = paths.best_pt
        log.info(
            "exported %s from %s (step %d, best val loss %s, verdict %s)",
            paths.best_pt,
            source,
            result.state.step,
            "-" if result.state.best_val_loss is None else f"{result.state.best_val_loss:.4f}",
            record.get("verdict") or ("not evaluated" if phase.gate is not None else f"none ({phase.name})"),
        )
    acc.wait_for_everyone()


def run_single(args: argparse.Namespace, paths: Paths, overrides: list[Override], outcome: Outcome) -> None:
    cfg = load_config(args.config, args.phase, overrides)
    phase = phase_named(cfg.phase)
    acc = make_accelerator(args.device, cfg.train.mixed_precision)
    setup_logging(acc.is_main_process, args.verbose)
    announce_compute(acc, args.device)
    with own_phases(acc, paths, (cfg.phase,)):
        tidy_phase_dir(acc, paths.phase_dir(cfg.phase), auto_resume=args.resume is None and not args.no_resume)
        init = paths.config_checkpoint(cfg.init_from) if cfg.init_from else None
        if phase.starts_from_a_model and init is None:
            log.warning("%s: init_from is null, %s starts from random weights", cfg.path, phase.title)
        inputs, start = plan_phase(acc, cfg, phase, paths, args.resume, not args.no_resume, init)
        if args.no_resume:
            start_afresh(acc, paths, (cfg.phase,))
        result = run_phase(acc, cfg, phase, paths, inputs, start, outcome)
        export_at_end(acc, phase, result, paths, outcome)


def pipeline_resume_phase(resume: Path | None) -> str | None:
    """Which phase an explicit --resume of a pipeline continues: the one its sidecar names."""
    if resume is None:
        return None
    phase = checkpoint_phase(resume)
    if phase is None:
        raise UserError(
            f"{resume}: a pipeline resumes from a checkpoint directory whose sidecar names its phase "
            f"(not an exported .pt); use {' or '.join(f'--phase {n}' for n in phase_names())} with it"
        )
    return phase


def run_pipeline(args: argparse.Namespace, paths: Paths, overrides: list[Override], outcome: Outcome) -> None:
    """The phases of a pipeline in order, each from the previous one's best. Started again, it continues in the
    phase where it stopped."""
    configs = load_pipeline(args.config, overrides).phases
    for a, b in zip(configs, configs[1:]):
        if a.train.mixed_precision != b.train.mixed_precision:
            raise UserError(
                f"{args.config}: {a.phase} and {b.phase} train_cfg.mixed_precision differ "
                f"({a.train.mixed_precision} vs {b.train.mixed_precision}); one process has one precision"
            )
    acc = make_accelerator(args.device, configs[0].train.mixed_precision)
    setup_logging(acc.is_main_process, args.verbose)
    announce_compute(acc, args.device)
    with own_phases(acc, paths, tuple(c.phase for c in configs)):
        pipeline_phases(acc, args, paths, configs, outcome)


def first_phase_to_run(
    acc, paths: Paths, configs: list[PhaseConfig], resume_phase: str | None, auto: bool
) -> tuple[int, bool]:
    """(the index of the phase the pipeline continues in, whether that phase has started): the last phase that
    has started (a later phase only ever starts after the one before finished), moved past any finished one."""

    def decide() -> tuple[int, bool]:
        started = [
            i
            for i, cfg in enumerate(configs)
            if resume_phase == cfg.phase or (auto and find_resume_checkpoint(paths.phase_dir(cfg.phase)) is not None)
        ]
        first = started[-1] if started else 0
        while (
            first < len(configs) - 1
            and auto
            and phase_finished(paths.phase_dir(configs[first].phase), configs[first].train.total_steps)
        ):
            first += 1
        return first, first in started

    return main_process_decides(acc, decide)


def pipeline_phases(acc, args: argparse.Namespace, paths: Paths, configs: list[PhaseConfig], outcome: Outcome) -> None:
    """The pipeline once it holds all its phases' folders (ownership.own_phases)."""
    names = tuple(c.phase for c in configs)
    resume_phase = main_process_decides(acc, lambda: pipeline_resume_phase(args.resume))
    if resume_phase is not None and resume_phase not in names:
        raise UserError(
            f"{args.resume}: a {resume_phase} checkpoint, and this pipeline has no {resume_phase} phase "
            f"({', '.join(names)})"
        )
    for name in names:
        tidy_phase_dir(acc, paths.phase_dir(name), auto_resume=args.resume is None and not args.no_resume)
    auto = not args.no_resume and resume_phase is None
    first, first_started = first_phase_to_run(acc, paths, configs, resume_phase, auto)
    if first > 0:
        title = phase_named(configs[first].phase).title
        log.info("pipeline: %s already finished; continuing with %s", configs[first - 1].phase, title)
    for i in range(first, len(configs)):
        cfg, phase = configs[i], phase_named(configs[i].phase)
        resume = args.resume if resume_phase == cfg.phase else None
        if i == 0:
            init = paths.config_checkpoint(cfg.init_from) if cfg.init_from else None
        else:
            before = configs[i - 1]
            init = paths.phase_dir(before.phase) / "best"
            started = i == first and first_started
            if not started and not main_process_decides(acc, init.exists):
                raise UserError(
                    f"{init}: {before.phase} finished without a best checkpoint to start {phase.title} from"
                )
        if i == first:
            # the inputs of every phase still to come are checked before any time is spent on this one
            plan, *_ = collect(
                lambda: plan_phase(acc, cfg, phase, paths, resume, auto, init),
                *[lambda later=later: check_phase_inputs(later, paths) for later in configs[i + 1 :]],
            )
            if args.no_resume:
                start_afresh(acc, paths, names)
        else:
            plan = plan_phase(acc, cfg, phase, paths, resume, auto, init)
        if i > 0 and plan[1].initial is not None:
            log.info(
                "pipeline: %s starts from the %s best %s (weights only, optimizer fresh)",
                phase.title,
                configs[i - 1].phase,
                init,
            )
        result = run_phase(acc, cfg, phase, paths, *plan, outcome)
    export_at_end(acc, phase, result, paths, outcome)


def print_plan(args: argparse.Namespace, paths: Paths, overrides: list[Override]) -> int:
    """--plan: what this command would do, on the main process; exit 2 if something would stop it."""
    configs = load_configs(args.phase, args.config, overrides)
    acc = make_accelerator(args.device, configs[0].train.mixed_precision)
    setup_logging(acc.is_main_process, args.verbose)
    plans = command_plans(
        args.phase,
        configs,
        paths,
        acc.num_processes,
        args.resume,
        auto_resume=not args.no_resume and args.resume is None,
    )
    outputs = output_problems(args, paths)
    if acc.is_main_process:
        print(
            f"compute: {acc.num_processes} process(es) on {acc.device}, precision {acc.mixed_precision}, "
            f"{torch.get_num_threads()} CPU threads per process"
        )
        for warning in compute_warnings(acc.device, acc.mixed_precision, acc.num_processes):
            print(f"warning: {warning}")
        rate = assumed_flops(acc.device, acc.mixed_precision, configs[0].train.tf32)
        for plan in plans:
            print(format_phase_plan(plan, paths, acc.mixed_precision, rate))
        print(plan_problems_text(plans, outputs))
    return 2 if any(plan.problems for plan in plans) or outputs else 0


def output_problems(args: argparse.Namespace, paths: Paths) -> list[str]:
    """Everything a run writes, checked before it trains (samples: where a config asks for them, in run_phase)."""
    return unwritable(
        [
            ("checkpoints", paths.checkpoints),
            ("the run registry", paths.runs),
            ("metrics", paths.metrics),
            ("the event log", paths.events.parent),
        ]
    ) + output_file_problem("--result-json", args.result_json)


def run(args: argparse.Namespace) -> int:
    """The whole command, from its parsed flags to its exit code (run.py parses them)."""
    paths = resolve_paths()
    outcome = Outcome(args.phase, args.config, args.sets, paths)
    status, failure = "failed", None
    try:
        overrides = parse_overrides(args.sets)
        if args.plan:
            return print_plan(args, paths, overrides)
        raise_if_any(output_problems(args, paths))
        (run_pipeline if args.phase == PIPELINE else run_single)(args, paths, overrides, outcome)
        status = "completed"
    except UserError as e:
        status, failure = "bad_input", "; ".join(e.problems)
        return report(e)
    except FloatingPointError as e:  # training diverged: not a bug in the trainer, so no traceback
        failure = str(e)
        print(f"error: {e}", file=sys.stderr)
    except Interrupted as e:
        status, failure = "interrupted", str(e)
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops after the same step; one line says so
            print(f"stopped: {e}", file=sys.stderr)
    except BaseException as e:  # a bug: the traceback is printed, and the result still says what happened
        failure = f"{type(e).__name__}: {e}"
        raise
    finally:
        if args.result_json is not None and not args.plan and int(os.environ.get("RANK", "0")) == 0:
            try:
                outcome.write(args.result_json, status, failure)
            except OSError as e:  # a directory there, or no room: said at start too when it can be known then
                print(
                    f"error: --result-json {args.result_json}: cannot write the result ({e.strerror or e})",
                    file=sys.stderr,
                )
        end_process_group()
    return EXIT_CODES[status]
