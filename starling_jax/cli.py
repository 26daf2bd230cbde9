"""What every entry point shares: logging set-up, the config command line, one-line errors, and the closing JSON
summary line."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable


def without_torch() -> None:
    """Makes `import torch` fail in this process; called by the JAX-only entry points when run as programs.

    PyTorch is never on the training path (only tests, benchmarks and `verify_hf`/`convert_starling` use it), but
    where it is installed (the dev environment, many users' machines) transformers' configuration modules and
    tensorboardX's writer import it anyway, as an option: 2.5–3 s of start-up per run on a 2-core machine
    (BENCHMARKS.md, "Start-up of a run"). With `sys.modules["torch"] = None` they see it as absent and take their
    torch-less paths. Not called when an entry point's `main()` runs inside another program (tests, notebooks),
    and a no-op where torch is already loaded."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]


def setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data's C++ chatter
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def initialize_distributed() -> None:
    """Joins a multi-process (multi-host) run before any device is touched.

    - TPU pod slices: `STARLING_JAX_DISTRIBUTED=1` (launch/tpu.sh sets it) → `jax.distributed.initialize()`,
      which finds the coordinator and process ids from the TPU metadata itself.
    - SLURM (launch/slurm.sh): `STARLING_JAX_DISTRIBUTED=slurm` → coordinator, process count and id from SLURM's
      environment (`slurm_distributed_args`).
    - Anywhere else (several processes on one machine simulating hosts, other clusters):
      `STARLING_JAX_COORDINATOR=host:port`, `STARLING_JAX_NUM_PROCESSES=N`, `STARLING_JAX_PROCESS_ID=i`.
    CPU processes exchange collectives through gloo.
    """
    coordinator = os.environ.get("STARLING_JAX_COORDINATOR")
    mode = os.environ.get("STARLING_JAX_DISTRIBUTED", "")
    if not coordinator and mode not in ("1", "slurm"):
        return
    kwargs = slurm_distributed_args(os.environ) if mode == "slurm" and not coordinator else None
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["STARLING_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["STARLING_JAX_PROCESS_ID"]),
        )
    elif kwargs is not None:
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize()


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[003-010,012],cpu1` → `gpu003`, `a1,a2` → `a1`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise ValueError(nodelist)
    prefix, ranges = m.group(1), m.group(2)
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def _slurm_tasks_on_node(env) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE look like `8(x2),4`."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key):
            m = re.match(r"(\d+)", env[key])
            if m:
                return int(m.group(1))
    return 1


def slurm_distributed_args(env) -> dict[str, Any]:
    """`jax.distributed.initialize` arguments for a process started by `srun` → coordinator on the step's first
    node (port STARLING_JAX_COORDINATOR_PORT, else derived from the job id), SLURM_NTASKS processes, id
    SLURM_PROCID. With several tasks per node each drives one GPU (SLURM_LOCALID); with one task per node it drives
    all of them. JAX's own SLURM detection is switched off: it would restrict a one-per-node process to GPU 0."""
    from starling_jax.errors import ConfigError

    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    for key, value in (
        ("SLURM_JOB_ID", env.get("SLURM_JOB_ID")),
        ("SLURM_STEP_NODELIST", nodelist),
        ("SLURM_NTASKS", env.get("SLURM_NTASKS")),
        ("SLURM_PROCID", env.get("SLURM_PROCID")),
        ("SLURM_LOCALID", env.get("SLURM_LOCALID")),
    ):
        if not value:
            raise ConfigError(
                f"STARLING_JAX_DISTRIBUTED=slurm but {key} is not set: start the processes with srun "
                "inside an sbatch/salloc allocation (launch/slurm.sh does)"
            )
    try:
        host = first_slurm_host(nodelist)
        port = int(env.get("STARLING_JAX_COORDINATOR_PORT") or 61440 + int(env["SLURM_JOB_ID"]) % 4096)
        num, pid, local = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"])
    except ValueError:
        raise ConfigError(
            f"SLURM environment not understood: nodelist {nodelist!r}, SLURM_NTASKS="
            f"{env.get('SLURM_NTASKS')!r}, SLURM_PROCID={env.get('SLURM_PROCID')!r}"
        ) from None
    return {
        "coordinator_address": f"{host}:{port}",
        "num_processes": num,
        "process_id": pid,
        "local_device_ids": [local] if _slurm_tasks_on_node(env) > 1 else None,
        "cluster_detection_method": "deactivate",
    }


def brief(text: str, limit: int = 400) -> str:
    """A library's error message fit for a one-line `error:`: its first non-empty line, whitespace collapsed, whole
    when it has at most `limit` characters, else cut at the last word boundary before `limit` with an ellipsis
    (never in the middle of a word)."""
    line = next((" ".join(ln.split()) for ln in str(text).splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit)
    return line[: cut if cut > 0 else limit].rstrip(" ,;:") + " …"


# The summary rule (docs/cli.md "The JSON summary"; tests/test_entry_points.py checks every entry point):
#   status      one of STATUSES:
#                 completed    did what it was asked (and its checks passed)           exit 0
#                 failed       ran to the end, but a check it makes failed             exit 1
#                              (verify_hf above tolerance, base_configs --check stale)
#                 preempted    a trainer stopped on a preemption signal, checkpoint saved (resume to finish)
#                 error        a user mistake or bad input; one `error:` line on stderr exit 2
#                 interrupted  Ctrl-C                                                   exit 130
#   output_dir  the folder the command wrote (a run, a prepared dataset, an HF folder, an evaluation folder)
#   output      the file it wrote (JSON lines); null when the lines went to stdout
#   hf_export_dir  a trainer's HF export (inside its run folder)
#   error_type, error  with status "error": the `StarlingError` class and its one-line message
# Keys an issue names are contracts and are never renamed (train_* `output_dir`, `steps`, `hf_export_dir`, ...).
STATUSES = ("completed", "failed", "preempted", "error", "interrupted")
EXIT_CODES = {"completed": 0, "failed": 1, "preempted": 0, "error": 2, "interrupted": 130}


def print_summary(summary: dict[str, Any]) -> None:
    """The last line an entry point prints: one JSON object scripts can parse with `tail -n1`."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def error_summary(e: BaseException, **extra: Any) -> dict[str, Any]:
    """The summary of a run stopped by a user mistake (status "error")."""
    return {"status": "error", "error_type": type(e).__name__, "error": str(e), **extra}


def run_main(main: Callable[[], dict[str, Any] | int], on_error: Callable[[], dict[str, Any]] | None = None) -> int:
    """Runs an entry point: a `StarlingError` (user mistake) becomes one line on stderr, a summary and exit 2; a
    summary is printed as the last line and its `status` gives the exit code (`EXIT_CODES`). `on_error()` adds
    keys to the error summary (e.g. the output folder, when known)."""
    from starling_jax.errors import StarlingError

    try:
        result = main()
    except StarlingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        print_summary(error_summary(e, **(on_error() if on_error else {})))
        return 2
    except KeyboardInterrupt:
        print_summary({"status": "interrupted"})
        return 130
    if isinstance(result, int):
        return result
    print_summary(result)
    return EXIT_CODES.get(result.get("status"), 0)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help`: the description as written, and each argument's default after its help (unless the help already
    says it, or there is none to show: a switch, or a None whose meaning the help gives)."""

    @staticmethod
    def shows_default(action: argparse.Action) -> bool:
        """Whether `--help` states this argument's default (tests/test_entry_points.py checks that it does)."""
        default = action.default
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
        return not switch and default is not None and default is not argparse.SUPPRESS and default != []

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or not self.shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action):
        if action.help is None and self.shows_default(action):  # argparse prints no line for a None help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every entry point: a usage mistake (unknown flag, bad choice, missing required flag, a value
    that does not parse) raises `UsageError` instead of printing the usage text and exiting, so it becomes the
    same one-line `error: ...`, JSON summary and exit 2 as every other mistake once `run_main` catches it (parse
    inside the function `run_main` runs). `--help` still prints the help and exits 0."""

    def __init__(self, *args, hint: str = "", **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.hint = hint  # said in every usage error, before the pointer to --help

    def error(self, message: str):
        from starling_jax.errors import UsageError

        raise UsageError(f"{message} ({self.hint}{'; ' if self.hint else ''}`{self.prog} --help` lists the flags)")


def config_parser(prog: str, doc: str, example_override: str) -> ArgumentParser:
    """The `[CONFIG.yaml] [key=value ...]` command line shared by the entry points that take a run config."""
    parser = ArgumentParser(
        prog=prog, description=doc, hint=f"settings are key=value overrides, e.g. {example_override}"
    )
    parser.add_argument("config", nargs="?", help="YAML config file (e.g. configs/rm_llama2_7b_starling.yaml)")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example_override}")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse (options may sit between overrides); a first positional holding `=` is an override, not a file.
    Usage errors raise `UsageError` (`ArgumentParser`): call this inside `run_main`."""
    args = parser.parse_intermixed_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    return args


# Where the embedded default `python -m starling_jax.train_rm` writes (RMRunConfig.output_dir's default): the other
# entry points' embedded defaults read it, so the four commands chain with no arguments.
DEFAULT_RUN_DIR = "runs/rm_default"
DEFAULT_HF_DIR = f"{DEFAULT_RUN_DIR}/hf"  # its HF export
# Tokens per sequence of the embedded train_rm run (RMRunConfig.data.max_length) and prepare_data's default
# --max-length: one constant, so `prepare_data` → `train_rm data.train=runs/prepared_default` chains as documented.
DEFAULT_MAX_LENGTH = 256


def embedded_default(value: str | None, default: str, flag: str) -> str:
    """`value` when the user gave `flag`; else `default` (written by the embedded train_rm run), which must exist."""
    from starling_jax.errors import ConfigError

    if value is not None:
        return value
    if not Path(default).exists():
        raise ConfigError(
            f"{flag} not given and the embedded default {default} does not exist: run "
            f"`python -m starling_jax.train_rm` first (it writes {DEFAULT_RUN_DIR}), or pass {flag}"
        )
    return default


def run_default_run(module: str, log_file: str | Path, what: str, alternative: str) -> None:
    """Runs `python -m <module>` with no arguments (an embedded default run another entry point needs first), its
    output shown as it comes, each line prefixed with `[<module>]` (so that its own `error:` line is not taken for
    this process's), and kept as it is in `log_file`. A failure is one `ConfigError` line naming the command, its
    exit code and its own error, and the log (never a traceback)."""
    from starling_jax.errors import ConfigError

    command = f"python -m {module}"
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"running `{command}` {what} (its output is also in {log_file})", file=sys.stderr, flush=True)
    last_error = ""
    with open(log_file, "w", encoding="utf-8") as log_out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for line in proc.stdout:
            sys.stderr.write(f"[{module.rsplit('.', 1)[-1]}] {line}")
            sys.stderr.flush()
            log_out.write(line)
            if line.startswith("error: "):
                last_error = line[len("error: ") :].strip()
        code = proc.wait()
    if code != 0:
        said = f": {last_error}" if last_error else ""
        raise ConfigError(
            f"`{command}`, run {what}, failed with exit code {code}{said}; its output is in {log_file}; "
            f"fix that and run again, or {alternative}"
        )


def config_main(argv, parser: argparse.ArgumentParser, train: Callable[[str | None, list[str]], dict[str, Any]]) -> int:
    """A training entry point: `[CONFIG.yaml] [key=value ...]` (`parser`: its `config_parser`) → logging →
    `train(config_file, overrides)` under `run_main` (one-line errors, JSON summary). `train` imports JAX itself, so
    --help and usage errors stay fast."""

    def run():
        args = parse_config_args(parser, sys.argv[1:] if argv is None else argv)
        setup_logging(args.verbose)
        return train(args.config, args.overrides)

    return run_main(run)
