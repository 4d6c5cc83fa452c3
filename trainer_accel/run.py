"""CLI: flags -> config -> phase(s) -> loop, and the pipeline's sequencing.

    accelerate launch -m trainer_accel.run --phase {pretrain,sft,pipeline} --config configs/X.json
    python -m trainer_accel.run ...   (one process, no launcher)

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

from trainer_accel.checkpoints.store import (
    InvalidCheckpoint,
    LoadedCheckpoint,
    checkpoint_phase,
    find_resume_checkpoint,
    model_sha256,
    phase_finished,
    read_meta,
    reconcile_pointers,
    set_aside_broken,
    sweep_leftovers,
)
from trainer_accel.config import PhaseConfig, load_phase_config, load_pipeline_config
from trainer_accel.devices.accelerator import announce_compute, make_accelerator
from trainer_accel.devices.collective import end_process_group, main_process_decides
from trainer_accel.devices.hardware import compute_warnings
from trainer_accel.devices.ownership import own_phases
from trainer_accel.devices.stopping import Interrupted
from trainer_accel.errors import UserError, exit_with, raise_if_any, report
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
from trainer_accel.training.inputs import (
    PhaseInputs,
    check_phase_inputs,
    check_start_checkpoint,
    collect,
    same_tokenizer,
)
from trainer_accel.training.loop import PhaseResult, Trainer

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer_accel.run", description=__doc__.split("\n")[0])
    p.add_argument("--phase", required=True, choices=("pretrain", "sft", "pipeline"))
    p.add_argument("--config", required=True, type=Path, help="phase config JSON (pipeline: the pipeline config)")
    p.add_argument(
        "--device",
        choices=("cpu", "mps", "cuda"),
        default=None,
        help="default: CUDA, else MPS, else CPU; under accelerate launch the launcher decides unless cpu",
    )
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory or exported .pt to resume from")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train_cfg.base_lr=1e-3 (repeatable; VALUE is JSON; "
        "in a pipeline prefix pretrain. or sft. to reach one phase)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print what the run would do (config, compute, data, checkpoints, resume) and exit without training",
    )
    p.add_argument(
        "--result-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a machine-readable result here when the run exits, also on failure",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (Accelerate, trackers, checkpoints)")
    args = p.parse_args(argv)
    if args.resume is not None and args.no_resume:
        p.error("--resume and --no-resume contradict each other")
    return args


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


def resume_point(cfg: PhaseConfig, paths: Paths, resume: Path | None, auto_resume: bool) -> Path | None:
    """The checkpoint a phase resumes from: an explicit --resume of this phase, or its newest intact checkpoint."""
    if resume is not None:
        owner = checkpoint_phase(resume)
        if owner is not None and owner != cfg.phase:
            raise UserError(
                f"{resume}: a {owner} checkpoint cannot resume the {cfg.phase} phase"
                + ("; set init_from in the sft config to start from its weights" if cfg.phase == "sft" else "")
            )
        return resume
    return find_resume_checkpoint(paths.phase_dir(cfg.phase)) if auto_resume else None


def plan_phase(
    acc, cfg: PhaseConfig, paths: Paths, resume: Path | None, auto_resume: bool, init: Path | None
) -> tuple[PhaseInputs, LoadedCheckpoint | None, LoadedCheckpoint | None]:
    """Check caches and starting checkpoints together; return the inputs and what the phase starts from.

    Which checkpoint to resume from is the main process's answer; then every process loads it."""
    resume = main_process_decides(acc, lambda: resume_point(cfg, paths, resume, auto_resume))
    init = init if resume is None else None  # a resumed phase continues its own weights
    inputs, resumed, initial = collect(
        lambda: check_phase_inputs(cfg, paths),
        lambda: check_start_checkpoint(resume, cfg),
        lambda: check_start_checkpoint(init, cfg, with_optimizer=False),
    )
    raise_if_any(same_tokenizer(initial, inputs))
    return inputs, resumed, initial


def check_same_start(acc, resumed: LoadedCheckpoint | None) -> None:
    """Every process must continue the same checkpoint; on several machines that needs one shared filesystem."""
    if acc.num_processes == 1:
        return
    steps = acc.gather(torch.tensor([-1 if resumed is None else resumed.step], device=acc.device)).tolist()
    if len(set(steps)) > 1:
        seen = ", ".join(f"process {r}: {'no checkpoint' if s < 0 else f'step {s}'}" for r, s in enumerate(steps))
        raise UserError(
            f"the processes found different checkpoints to resume from ({seen}); the checkpoints dir "
            "must be one filesystem that every machine sees"
        )


def run_phase(
    acc, cfg: PhaseConfig, paths: Paths, inputs: PhaseInputs, resumed, initial, outcome: Outcome
) -> PhaseResult:
    check_same_start(acc, resumed)
    if cfg.sample_prompts:
        raise_if_any(unwritable([("samples", paths.samples)]))
    trainer = Trainer(
        acc,
        cfg,
        inputs.strategy,
        paths,
        resume_from=resumed,
        init_from=initial,
        data_info=inputs.data_info(),
        chat=inputs.chat_format(),
    )
    outcome.started(trainer)
    result = trainer.fit()
    if cfg.phase == "sft":
        outcome.verdict = promotion_gate(acc, paths, result, trainer.parent)
    return result


def promotion_gate(acc, paths: Paths, result: PhaseResult, parent: dict | None) -> str | None:
    """The end of SFT: the eval summary of its best against the checkpoint it started from (evaluation.py)."""
    verdict = None
    if acc.is_main_process:
        baseline = Path(parent["checkpoint"]) if parent and parent.get("relation") == "initialised" else None
        if baseline is None or not baseline.exists() or not same_weights(baseline, parent.get("model_sha256")):
            log.warning(
                "sft: the checkpoint it started from is not there to compare with%s; no eval summary, not deployable",
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


def export_at_end(acc, result: PhaseResult, paths: Paths, outcome: Outcome) -> None:
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
            record.get("verdict") or ("not evaluated" if result.phase == "sft" else "none (pretrain)"),
        )
    acc.wait_for_everyone()


def run_single(args: argparse.Namespace, paths: Paths, overrides: list[Override], outcome: Outcome) -> None:
    cfg = load_phase_config(args.config, args.phase, overrides)
    acc = make_accelerator(args.device, cfg.train.mixed_precision)
    setup_logging(acc.is_main_process, args.verbose)
    announce_compute(acc, args.device)
    with own_phases(acc, paths, (cfg.phase,)):
        tidy_phase_dir(acc, paths.phase_dir(cfg.phase), auto_resume=args.resume is None and not args.no_resume)
        init = paths.config_checkpoint(cfg.init_from) if cfg.init_from else None
        if cfg.phase == "sft" and init is None:
            log.warning("%s: init_from is null, SFT starts from random weights", cfg.path)
        inputs, resumed, initial = plan_phase(acc, cfg, paths, args.resume, not args.no_resume, init)
        if args.no_resume:
            start_afresh(acc, paths, (cfg.phase,))
        export_at_end(acc, run_phase(acc, cfg, paths, inputs, resumed, initial, outcome), paths, outcome)


def pipeline_resume_phase(resume: Path | None) -> str | None:
    """Which phase an explicit --resume of a pipeline continues: the one its sidecar names."""
    if resume is None:
        return None
    phase = checkpoint_phase(resume)
    if phase is None:
        raise UserError(
            f"{resume}: a pipeline resumes from a checkpoint directory whose sidecar names its phase "
            "(not an exported .pt); use --phase pretrain or --phase sft with it"
        )
    return phase


def run_pipeline(args: argparse.Namespace, paths: Paths, overrides: list[Override], outcome: Outcome) -> None:
    """Pretrain, then SFT from the pretrain best. Started again, it continues in the phase where it stopped."""
    pipe = load_pipeline_config(args.config, overrides)
    pre, sft = pipe.pretrain, pipe.sft
    if pre.train.mixed_precision != sft.train.mixed_precision:
        raise UserError(
            f"{args.config}: pretrain and sft train_cfg.mixed_precision differ "
            f"({pre.train.mixed_precision} vs {sft.train.mixed_precision}); one process has one precision"
        )
    acc = make_accelerator(args.device, pre.train.mixed_precision)
    setup_logging(acc.is_main_process, args.verbose)
    announce_compute(acc, args.device)
    with own_phases(acc, paths, ("pretrain", "sft")):
        pipeline_phases(acc, args, paths, pre, sft, outcome)


def pipeline_phases(
    acc, args: argparse.Namespace, paths: Paths, pre: PhaseConfig, sft: PhaseConfig, outcome: Outcome
) -> None:
    """The pipeline once it holds both phases' folders (ownership.own_phases)."""
    resume_phase = main_process_decides(acc, lambda: pipeline_resume_phase(args.resume))
    for phase in ("pretrain", "sft"):
        tidy_phase_dir(acc, paths.phase_dir(phase), auto_resume=args.resume is None and not args.no_resume)
    auto = not args.no_resume and resume_phase is None
    pre_best = paths.phase_dir("pretrain") / "best"

    def progress() -> tuple[bool, bool]:
        # SFT only ever starts after pretrain finished, so an SFT checkpoint means pretrain is done.
        sft_started = resume_phase == "sft" or (auto and find_resume_checkpoint(paths.phase_dir("sft")) is not None)
        return sft_started, sft_started or (auto and phase_finished(paths.phase_dir("pretrain"), pre.train.total_steps))

    sft_started, pretrain_done = main_process_decides(acc, progress)
    if pretrain_done:
        log.info("pipeline: pretrain already finished; continuing with SFT")
    else:
        pre_resume = args.resume if resume_phase == "pretrain" else None
        # both phases' inputs are checked before any time is spent on pretrain
        pre_init = paths.config_checkpoint(pre.init_from) if pre.init_from else None
        pre_plan, _ = collect(
            lambda: plan_phase(acc, pre, paths, pre_resume, auto, pre_init), lambda: check_phase_inputs(sft, paths)
        )
        if args.no_resume:
            start_afresh(acc, paths, ("pretrain", "sft"))
        run_phase(acc, pre, paths, *pre_plan, outcome)
    if not sft_started and not main_process_decides(acc, pre_best.exists):
        raise UserError(f"{pre_best}: pretrain finished without a best checkpoint to start SFT from")
    sft_plan = plan_phase(acc, sft, paths, args.resume if resume_phase == "sft" else None, auto, pre_best)
    if sft_plan[2] is not None:
        log.info("pipeline: SFT starts from the pretrain best %s (weights only, optimizer fresh)", pre_best)
    export_at_end(acc, run_phase(acc, sft, paths, *sft_plan, outcome), paths, outcome)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = resolve_paths()
    outcome = Outcome(args.phase, args.config, args.sets, paths)
    status, failure = "failed", None
    try:
        overrides = parse_overrides(args.sets)
        if args.plan:
            return print_plan(args, paths, overrides)
        raise_if_any(output_problems(args, paths))
        (run_pipeline if args.phase == "pipeline" else run_single)(args, paths, overrides, outcome)
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


if __name__ == "__main__":
    exit_with(main)
