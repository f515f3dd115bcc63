"""`python -m service`: read settings from the environment and run uvicorn.

`SERVE_COMMAND` is the one serve command: the Dockerfile's CMD and the real-server test both
use it (a test checks they agree), so what is tested is what ships.
"""

from __future__ import annotations

import logging
import os
import sys

SERVE_COMMAND = ["python", "-m", "service"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nSettings (environment variables):")
        from service.settings import ENV_PREFIX, Settings

        for name, field in Settings.model_fields.items():
            print(f"  {ENV_PREFIX}{name.upper():<22} default {field.default!s:<30} {field.description or ''}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # oneDNN kernels: faster on x86 CPUs
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
