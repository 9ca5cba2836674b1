"""Process entry: `python -m mlx_runtime` with `runtime/` on PYTHONPATH.

Exit codes: 0 after `shutdown` or end of input, 64 for a setting out of
range (MLX_RUNTIME_STREAMS_LIVE_MAX,
MLX_RUNTIME_BATCH_SIZE, MLX_RUNTIME_PREFILL_STEP_SIZE), 69 if MLX cannot be imported, 130 on
SIGINT.
"""

import argparse
import logging
import os
import sys

from .limits import settings as read_settings

EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_INTERRUPTED = 130
READY_LINE = "MLX Runtime ready"

log = logging.getLogger("mlx_runtime")


def claim_stdout():
    """Keep the real stdout for protocol lines; send anything else printed to stderr.

    Libraries that print (progress bars, warnings via print) would otherwise
    corrupt the JSON stream.
    """
    sys.stdout.flush()
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol_out


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_runtime", description="MLX runtime (JSON-RPC on stdio)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="stderr log level",
    )
    args = parser.parse_args()
    protocol_out = claim_stdout()
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = read_settings(os.environ)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    try:
        # Also imports mlx_lm and transformers, which is most of the start-up time.
        import mlx.core as mx

        from .jsonrpc import Writer
        from .server import Server
    except ImportError as exc:
        log.error("MLX is not importable (%s); install runtime/requirements.txt", exc)
        return EXIT_UNAVAILABLE

    server = Server(Writer(protocol_out), settings)
    sys.stderr.write(READY_LINE + "\n")
    sys.stderr.flush()
    try:
        stopped = server.serve(sys.stdin.buffer)
    except KeyboardInterrupt:
        # `serve` has stopped what it could; skip interpreter teardown (see below).
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)
    log.info("exiting")
    if not stopped:
        # The compute thread is inside MLX (a long load); do not wait for it.
        logging.shutdown()
        os._exit(0)
    # mlx_lm creates a stream on this thread at import; release it before
    # interpreter teardown, as the compute thread does for its own.
    mx.clear_streams()
    return 0


if __name__ == "__main__":
    sys.exit(main())
