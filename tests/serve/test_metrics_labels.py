"""No metric label value comes from the client: unknown paths are `other`, routes are the app's templates."""

from __future__ import annotations

from fastapi.testclient import TestClient


def _route_labels(client: TestClient) -> set[str]:
    labels = set()
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("secondstage_requests_total{"):
            labels.add(line.split('route="', 1)[1].split('"', 1)[0])
    return labels


def test_unknown_paths_are_other_and_known_routes_keep_their_name(client: TestClient) -> None:
    for i in range(50):
        client.get(f"/admin/probe-{i}")
        client.post(f"/v1/whatever/{i}", json={})
    client.get("/health/ready")
    client.post("/admin/policies/reload")  # policies are disabled here: a 404, still its own route
    client.post("/v1/chat/completions", content=b"x" * 2_000_000)  # refused before routing: 413
    labels = _route_labels(client)
    assert not any("probe" in label or "whatever" in label for label in labels), labels
    assert {"other", "/health/ready", "/admin/policies/reload", "/v1/chat/completions"} <= labels, labels
    metrics = client.get("/metrics").text
    assert 'secondstage_requests_total{route="other",status="404"} 100.0' in metrics
    assert 'secondstage_requests_total{route="/v1/chat/completions",status="413"} 1.0' in metrics
    # Nothing per key or per user: no metric of ours carries such a label.
    assert not any(
        line.startswith("secondstage_") and ('key="' in line or 'user="' in line) for line in metrics.splitlines()
    )
