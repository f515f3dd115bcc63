"""The body of POST /v1/feedback -> `FeedbackItem`s, checked before anything is looked up.

`{"feedback": [{"prediction_id": "<hex>", "label": 3}, {"request_id": "<X-Request-ID>", "index": 0,
"label": 3}, ...]}`: each item names a served prediction by its id, or by the predict call's
request ID and the image's index in that call, and gives its true class. The list is all or
nothing (docs/monitoring.md): a malformed item is a 422 naming its position before the database
is touched; the store then resolves every item before it writes any.
"""

from __future__ import annotations

import re

from service.inputs import InputError
from service.storage.monitoring_store import FeedbackItem

PREDICTION_ID = re.compile(r"[0-9a-f]{32}")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")   # service.rest.request_id.SANE_ID
MAX_INDEX = 1_000_000


def _integer(value, what: str, where: str) -> int:
    """An int, or a float with an integral value (JSON Schema counts 3.0 as an integer)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError("invalid_request", f"{where}: {what} must be an integer, got {value!r}"[:300])
    return value


def feedback_items(payload: dict, max_items: int) -> list[FeedbackItem]:
    """InputError 422 `invalid_request` (or `invalid_label` for a negative label) naming the item."""
    items = payload.get("feedback") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise InputError("invalid_request", 'the body must be {"feedback": [{"prediction_id": ..., "label": ...}, '
                                            '...]} with at least one item')
    if len(items) > max_items:
        raise InputError("too_many_instances", f"{len(items)} feedback items; at most {max_items} a request "
                                               f"(CALIB_MAX_EVAL_IMAGES)")
    out = []
    for position, item in enumerate(items):
        where = f"feedback[{position}]"
        if not isinstance(item, dict):
            raise InputError("invalid_request", f"{where} must be an object")
        unknown = set(item) - {"prediction_id", "request_id", "index", "label"}
        if unknown:
            raise InputError("invalid_request", f"{where}: unknown field(s) {sorted(unknown)[:5]}")
        if "label" not in item:
            raise InputError("invalid_request", f"{where}: label is missing")
        label = _integer(item["label"], "label", where)
        if label < 0:
            raise InputError("invalid_label", f"{where}: label {label} is not a class index (0..K-1)")
        if "prediction_id" in item:
            if "request_id" in item or "index" in item:
                raise InputError("invalid_request", f"{where}: give prediction_id, or request_id and index, "
                                                     f"not both")
            pid = item["prediction_id"]
            if not isinstance(pid, str) or not PREDICTION_ID.fullmatch(pid):
                raise InputError("invalid_request", f"{where}: prediction_id must be the 32 hex digits predict "
                                                     f"returned")
            out.append(FeedbackItem(position, label, prediction_id=pid))
            continue
        if "request_id" not in item or "index" not in item:
            raise InputError("invalid_request", f"{where}: give prediction_id, or request_id and index")
        rid = item["request_id"]
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
            raise InputError("invalid_request", f"{where}: request_id must be the X-Request-ID of a predict "
                                                 f"answer (1-128 characters of [A-Za-z0-9._:+/=-])")
        index = _integer(item["index"], "index", where)
        if not 0 <= index < MAX_INDEX:
            raise InputError("invalid_request", f"{where}: index must be the image's position in its predict "
                                                 f"call (0 or more)")
        out.append(FeedbackItem(position, label, request_id=rid, index=index))
    return out
