"""REST service: calibrated predictions with MC-dropout uncertainty and ECE reports.

Layout (after Seldon MLServer and FastAPI's "bigger applications"):
settings -> registry (artifacts on disk) -> dataplane (numpy in, numpy out) <- inputs (payload
parsing) <- rest/ (HTTP only). `create_app` lives in `service.app`; it is not imported here so
that `import service.settings` stays cheap (no TensorFlow, no FastAPI).
"""
