"""What every entry point shares: logging set-up, one-line errors, and the closing JSON summary line."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable


def setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data's C++ chatter
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def initialize_distributed() -> None:
    """Joins a multi-process (multi-host) run before any device is touched.

    - TPU pod slices: `STARLING_JAX_DISTRIBUTED=1` (the launch scripts set it) → `jax.distributed.initialize()`,
      which finds the coordinator and process ids from the TPU metadata itself.
    - Anywhere else (GPU clusters, or several processes on one machine simulating hosts):
      `STARLING_JAX_COORDINATOR=host:port`, `STARLING_JAX_NUM_PROCESSES=N`, `STARLING_JAX_PROCESS_ID=i`.
    CPU processes exchange collectives through gloo.
    """
    coordinator = os.environ.get("STARLING_JAX_COORDINATOR")
    if not coordinator and os.environ.get("STARLING_JAX_DISTRIBUTED") != "1":
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["STARLING_JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["STARLING_JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def print_summary(summary: dict[str, Any]) -> None:
    """The last line an entry point prints: one JSON object scripts can parse with `tail -n1`."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def run_main(main: Callable[[], dict[str, Any] | int]) -> int:
    """Runs an entry point: a `StarlingError` (user mistake) becomes one line on stderr, a summary and exit 2."""
    from starling_jax.errors import StarlingError

    try:
        result = main()
    except StarlingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        print_summary({"status": "error", "error_type": type(e).__name__, "error": str(e)})
        return 2
    except KeyboardInterrupt:
        print_summary({"status": "interrupted"})
        return 130
    if isinstance(result, int):
        return result
    print_summary(result)
    return 0
