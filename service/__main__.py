"""`python -m service`: read settings from the environment and run uvicorn.

`SERVE_COMMAND` is the one serve command: the Dockerfile's CMD and the real-server test both
use it (a test checks they agree), so what is tested is what ships.
"""

from __future__ import annotations

import logging
import sys

from commandline import CommandError, UsageError, command, invoked_as, setup_tensorflow

SERVE_COMMAND = ["python", "-m", "service"]
PROG = invoked_as("service", "calib-serve")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nSettings (environment variables):")
        from service.settings import ENV_PREFIX, Settings

        for name, field in Settings.model_fields.items():
            default = field.get_default(call_default_factory=True)
            print(f"  {ENV_PREFIX}{name.upper():<22} default {default!s:<30} {field.description or ''}")
        return 0
    return serve(argv)


@command(PROG)
def serve(argv: list[str]) -> int:
    """Check the settings and the model directory, then serve (errors: one line, exit 2 or 1)."""
    setup_tensorflow()   # quiet TensorFlow start-up, oneDNN kernels (faster on x86 CPUs)
    from service.settings import ENV_PREFIX

    if argv:
        raise UsageError(f"unexpected arguments {' '.join(argv)}: settings come from {ENV_PREFIX}* "
                         "environment variables (see --help)")
    from service.settings import load_settings

    settings = load_settings()
    if not settings.model_dir.exists():
        raise CommandError(f"model directory {settings.model_dir} does not exist "
                           f"(set {ENV_PREFIX}MODEL_DIR to a folder of artifacts or one artifact)")
    if settings.workers > 1:
        # before anything imports prometheus_client: the workers' metrics dir must be in the environment
        from service.workers import serve_workers

        setup_logging(settings)
        failed = serve_workers(settings)
        if failed:
            raise CommandError(f"{failed} worker process(es) failed to start (see the log above: e.g. the app "
                               "or its models could not load); the server stopped")
        return 0
    import uvicorn   # the app's imports take seconds: only once the settings are known good

    from service.app import create_app

    setup_logging(settings)
    # access_log=False: the app writes its own access line ("service.access", with the request ID)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=settings.graceful_timeout_s,
                access_log=False)
    return 0


def setup_logging(settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
