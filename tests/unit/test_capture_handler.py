from __future__ import annotations

import json

from lambdas.capture.handler import slot_lag_metric


def test_slot_lag_metric_is_an_embedded_metric_format_line() -> None:
    line = json.loads(slot_lag_metric("encore_capture", 4096))

    (directive,) = line["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "Encore"
    assert directive["Metrics"] == [{"Name": "SlotLagBytes", "Unit": "Bytes"}]
    assert (line["SlotName"], line["SlotLagBytes"]) == ("encore_capture", 4096)
