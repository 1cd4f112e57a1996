"""The metric names and types the deployment's dashboards and alerts rely on, in valid exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from vlltr.service.metrics import Metrics

EXPECTED = {
    "vlltr_request_duration_seconds": "histogram",
    "vlltr_queue_wait_seconds": "histogram",
    "vlltr_preprocess_duration_seconds": "histogram",
    "vlltr_inference_duration_seconds": "histogram",
    "vlltr_batch_size": "histogram",
    "vlltr_queue_depth": "gauge",
    "vlltr_queue_capacity": "gauge",
    "vlltr_cache_lookups": "counter",
    "vlltr_requests_rejected": "counter",
    "vlltr_classes": "gauge",
    "vlltr_predictions": "counter",
    "vlltr_model_info": "gauge",  # an Info metric is exposed as a gauge with value 1 in the text format
    "vlltr_class_table_version": "gauge",
}


def _families(metrics: Metrics) -> dict:
    text, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_exact_names_and_types():
    metrics = Metrics(redis_enabled=True)
    metrics.set_model_info(bundle_id="b", provider="cpu", precision="fp32")
    metrics.request_duration.labels(route="/v1/classify", method="POST", status="200").observe(0.003)
    families = _families(metrics)
    for name, kind in EXPECTED.items():
        assert families[name].type == kind, name
    assert families["vlltr_redis_up"].type == "gauge"
    info = families["vlltr_model_info"].samples[0]
    assert info.labels == {"bundle_id": "b", "provider": "cpu", "precision": "fp32"}
    buckets = sorted(
        float(s.labels["le"]) for s in families["vlltr_request_duration_seconds"].samples if s.name.endswith("_bucket")
    )
    assert buckets[:3] == [0.001, 0.0025, 0.005] and buckets[-2:] == [10.0, float("inf")]
    sizes = [float(s.labels["le"]) for s in families["vlltr_batch_size"].samples if s.name.endswith("_bucket")]
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, float("inf")]


def test_labelled_series_exist_from_the_start():
    families = _families(Metrics())
    reasons = {s.labels["reason"] for s in families["vlltr_requests_rejected"].samples}
    assert reasons == {
        "queue_full",
        "too_large",
        "bad_image",
        "unsupported_type",
        "invalid",
        "unauthorized",
        "forbidden",
        "timeout",
    }
    assert {s.labels["stage"] for s in families["vlltr_http_read_timeouts"].samples} == {"head", "body"}
    assert {s.labels["tier"] for s in families["vlltr_predictions"].samples} == {"head", "medium", "tail", "added"}
    assert {s.labels["result"] for s in families["vlltr_cache_lookups"].samples} == {"hit", "miss", "error"}
    assert {s.labels["source"] for s in families["vlltr_classes"].samples} == {"trained", "added"}


def test_redis_up_only_exists_with_redis():
    assert "vlltr_redis_up" not in _families(Metrics(redis_enabled=False))
    metrics = Metrics(redis_enabled=False)
    metrics.set_redis_up(True)  # a no-op, not an error
    with_redis = Metrics(redis_enabled=True)
    with_redis.set_redis_up(False)
    assert with_redis.registry.get_sample_value("vlltr_redis_up") == 0


def test_separate_apps_do_not_share_series():
    a, b = Metrics(), Metrics()
    a.batch_size.observe(4)
    assert a.registry.get_sample_value("vlltr_batch_size_count") == 1
    assert b.registry.get_sample_value("vlltr_batch_size_count") == 0
