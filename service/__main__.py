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
            default = field.get_default(call_default_factory=True)
            print(f"  {ENV_PREFIX}{name.upper():<22} default {default!s:<30} {field.description or ''}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # oneDNN kernels: faster on x86 CPUs
    import uvicorn
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:  # e.g. an unreadable CALIB_API_KEYS_FILE: say so, no traceback
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    from service.app import create_app  # after the settings check: this imports TensorFlow

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # access_log=False: the app writes its own access line ("service.access", with the request ID)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=10, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
