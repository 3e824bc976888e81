"""The checker the alert and dashboard tests rely on: it finds the metric names of a query, and the
exported names come from the code's collectors."""

from tests.monitoring.exported import exported_names, metric_names


def test_metric_names_of_queries():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, route) (rate(stemgen_http_request_duration_seconds_bucket'
        '{route!~"/health.*", method="POST"}[$__rate_interval])))') == {
            "stemgen_http_request_duration_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / (sum(rate(b_total[5m])) or vector(0)) > 0.05") == {
        "a_total", "b_total"}
    assert metric_names('x unless on (model) count by (model) (y{a="by (z)"}) and on () w offset 5m'
                        ' > 1e3') == {"x", "y", "w"}
    assert metric_names("sum(stemgen_x) by (instance) * on(instance) group_left(model) m") == {
        "stemgen_x", "m"}
    assert metric_names('up{job="stemgen-worker"} == 1') == {"up"}


def test_exported_names_come_from_the_collectors(monkeypatch):
    names = exported_names(monkeypatch)
    # a labelled counter and histogram nobody has touched, a label-less counter, a scrape-time
    # gauge of the gateway, and a CUDA worker's collector
    assert {"stemgen_callback_deliveries_total", "stemgen_queue_wait_seconds_bucket",
            "stemgen_jobs_accepted_total", "stemgen_outbox_jobs", "stemgen_job_store_up",
            "stemgen_cuda_memory_reserved_bytes", "process_resident_memory_bytes"} <= names
    assert "stemgen_callback_deliveries" not in names and "stemgen_nothing_total" not in names


def test_matcher_labels_of_queries():
    from tests.monitoring.exported import matcher_labels

    assert matcher_labels('sum(rate(a_total{outcome!="success", job=~"x|y"}[5m])) / b{le="+Inf"}'
                          ' and c{ }') == {"a_total": {"outcome", "job"}, "b": {"le"}, "c": set()}
    assert matcher_labels('rate(h_bucket{route!~"/health.*|/metrics"}[$__rate_interval])') == {
        "h_bucket": {"route"}}


def test_exported_labels_come_from_the_metric_objects(monkeypatch):
    from tests.monitoring.exported import exported_labels

    labels = exported_labels(monkeypatch)
    assert labels["stemgen_callback_deliveries_total"] == {"outcome"}
    assert labels["stemgen_queue_wait_seconds_bucket"] == {"task", "le"}
    assert labels["stemgen_queue_wait_seconds_count"] == {"task"}
    assert labels["stemgen_http_requests_total"] == {"method", "route", "status"}
    assert labels["stemgen_outbox_jobs"] == set()
    assert labels["stemgen_cuda_memory_reserved_bytes"] == {"device"}
