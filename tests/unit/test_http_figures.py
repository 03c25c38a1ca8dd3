"""The HTTP figures render as Prometheus counters and cumulative histograms (le inclusive)."""

from __future__ import annotations

from message_broker.metrics import Metrics

from ..helpers import samples, value


def test_requests_and_durations_by_route() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.0015, 0.3, 99.0):
        metrics.http.observe("/api/v1/user/{user_id}", "GET", 200, seconds)
    metrics.http.observe("/api/v1/user/{user_id}", "GET", 404, 0.002)
    found = samples(metrics.render().decode())
    route = "/api/v1/user/{user_id}"
    name = "message_broker_http_requests_total"
    assert value(found, name, route=route, method="GET", status="200") == 4
    assert value(found, name, route=route, method="GET", status="404") == 1
    bucket = "message_broker_http_request_duration_seconds_bucket"
    assert value(found, bucket, route=route, le="0.001") == 1  # a value on a bound counts in it
    assert value(found, bucket, route=route, le="0.002") == 3
    assert value(found, bucket, route=route, le="0.5") == 4
    assert value(found, bucket, route=route, le="60.0") == 4
    assert value(found, bucket, route=route, le="+Inf") == 5
    assert value(found, "message_broker_http_request_duration_seconds_count", route=route) == 5
    assert abs(value(found, "message_broker_http_request_duration_seconds_sum", route=route) - 99.3045) < 1e-9
