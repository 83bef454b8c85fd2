"""deploy/k8s as a cluster would take it: every document valid for a pinned Kubernetes, nothing it references
missing, and the settings that matter (probes, termination, exit codes, network paths) as README.md says.

Validation is kubernetes-validate's strict schemas (unknown fields are errors, as `kubectl apply` rejects them),
offline; no cluster and no kubectl needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from align.job import EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"
"""The oldest Kubernetes the manifests are written for (podFailurePolicy is GA since 1.31, preStop `sleep`
since 1.30); bump it when using a newer field."""

MANIFESTS = [*sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"), DEPLOY / "secrets.example.yaml"]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} in deploy/, found {len(matches)}"
    return matches[0]


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def workloads() -> Iterator[dict[str, Any]]:
    return (d for d in all_documents() if d["kind"] in WORKLOADS)


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_template(workload)["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_document_is_valid_kubernetes(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")


def test_kustomization_lists_every_manifest_and_only_those() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, "plain manifests: nothing generated, no patches"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in MANIFESTS if p.parent == K8S)
    # Secrets are created once, outside the manifests (applying again must not overwrite them).
    assert all(d["kind"] != "Secret" for p in listed for d in documents(K8S / p))


def references(pod: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every Secret, ConfigMap, PVC and ServiceAccount a pod spec uses."""
    spec = pod["spec"]
    refs = {("ServiceAccount", spec.get("serviceAccountName", "default"))}
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            refs.add(("Secret", volume["secret"]["secretName"]))
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"]))
        if "persistentVolumeClaim" in volume:
            refs.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("env", []):
            source = e.get("valueFrom", {})
            if "secretKeyRef" in source:
                refs.add(("Secret", source["secretKeyRef"]["name"]))
            if "configMapKeyRef" in source:
                refs.add(("ConfigMap", source["configMapKeyRef"]["name"]))
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                refs.add(("Secret", e["secretRef"]["name"]))
            if "configMapRef" in e:
                refs.add(("ConfigMap", e["configMapRef"]["name"]))
    return refs


def test_everything_a_workload_references_is_defined_in_deploy() -> None:
    defined = {(d["kind"], d["metadata"]["name"]) for d in all_documents()}
    for w in workloads():
        # A StatefulSet's volumeClaimTemplates create their own claims.
        own = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        pod = pod_template(w)
        mounted = {m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        declared = {v["name"] for v in pod["spec"].get("volumes", [])}
        assert mounted <= declared | own, f"{w['metadata']['name']}: mounts {mounted - declared - own} undeclared"
        missing = {r for r in references(pod) if r not in defined and r != ("ServiceAccount", "default")}
        assert not missing, f"{w['kind']}/{w['metadata']['name']} references {missing}, not defined in deploy/"


def test_secret_keys_used_exist_in_the_secrets() -> None:
    for w in workloads():
        pod = pod_template(w)
        for c in pod["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in find("Secret", ref["name"])["stringData"], (w["metadata"]["name"], ref)
        for v in pod["spec"].get("volumes", []):
            if "secret" in v:
                assert find("Secret", v["secret"]["secretName"])["stringData"]


def test_the_policies_configmap_is_policies_dir_as_generated() -> None:
    data = find("ConfigMap", "secondstage-policies")["data"]
    expected = {p.name: p.read_text() for p in sorted((ROOT / "policies").glob("*.yaml"))}
    assert data == expected, "deploy/k8s/policies.yaml is stale: run `python deploy/policies_configmap.py`"


def test_serve_reads_policies_from_the_configmap_mount() -> None:
    serve = find("StatefulSet", "secondstage-serve")
    c = container(serve, "serve")
    volumes = {v["name"]: v for v in pod_template(serve)["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    policies_dir = env_of(c)["SECONDSTAGE_POLICIES_DIR"]
    assert volumes[mounts[policies_dir]]["configMap"]["name"] == "secondstage-policies"
    admin_key = Path(env_of(c)["SECONDSTAGE_ADMIN_KEY_FILE"])
    assert volumes[mounts[str(admin_key.parent)]]["secret"]["secretName"] == "secondstage-admin"
    assert admin_key.name in find("Secret", "secondstage-admin")["stringData"]


def test_align_checks_corrections_against_the_same_policies_configmap() -> None:
    cron = find("CronJob", "secondstage-align")
    c = container(cron, "align")
    volumes = {v["name"]: v for v in pod_template(cron)["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    policies_dir = env_of(c)["SECONDSTAGE_POLICIES_DIR"]
    assert volumes[mounts[policies_dir]]["configMap"]["name"] == "secondstage-policies"


def test_a_replaced_serve_pod_keeps_its_name_and_its_spool() -> None:
    """serve is a StatefulSet: the replica name is the pod name, and var/spool is the pod's own claim."""
    from serve.settings import ServeSettings

    serve = find("StatefulSet", "secondstage-serve")
    spec, pod = serve["spec"], pod_template(serve)
    c = container(serve, "serve")
    replica = next(e for e in c["env"] if e["name"] == "SECONDSTAGE_REPLICA_NAME")
    assert replica["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The spool directory serve computes (var/spool/<replica>) lies on a volumeClaimTemplate, not the shared volume.
    settings = ServeSettings(var_dir=Path(env_of(c)["SECONDSTAGE_VAR_DIR"]), replica_name="secondstage-serve-0")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    spool_volume = mounts[str(settings.spool_dir.parent)]
    assert spool_volume in {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    assert spool_volume not in {v["name"] for v in pod["spec"]["volumes"]}
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert spec["podManagementPolicy"] == "Parallel"
    # The governing Service is headless; it, the public Service and the PDB select exactly these pods.
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    governing = find("Service", spec["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    for selector in (
        governing["spec"]["selector"],
        find("Service", "secondstage")["spec"]["selector"],
        find("PodDisruptionBudget", "secondstage-serve")["spec"]["selector"]["matchLabels"],
        find("NetworkPolicy", "secondstage-serve")["spec"]["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), selector


def test_serve_probes_resources_and_termination() -> None:
    serve = find("StatefulSet", "secondstage-serve")
    pod = pod_template(serve)["spec"]
    c = container(serve, "serve")
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a real model load takes minutes"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env_of(c)["SECONDSTAGE_TENSOR_PARALLEL_SIZE"]) == gpus
    shm = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in pod["volumes"] if v["name"] == shm)["emptyDir"]["medium"] == "Memory"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 120, "time left to drain streams after the preStop"


def test_the_public_service_exposes_the_api_port_only() -> None:
    service = find("Service", "secondstage")
    serve = container(find("StatefulSet", "secondstage-serve"), "serve")
    ports = {p["name"]: p["containerPort"] for p in serve["ports"]}
    assert ports["operator"] == int(env_of(serve)["SECONDSTAGE_ADMIN_PORT"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["api"]


def test_operator_port_and_redis_are_off_the_public_path() -> None:
    serve_policy = find("NetworkPolicy", "secondstage-serve")["spec"]["ingress"]
    open_ports = [p["port"] for rule in serve_policy if "from" not in rule for p in rule["ports"]]
    assert open_ports == ["api"]
    operator = next(rule for rule in serve_policy if any(p["port"] == "operator" for p in rule["ports"]))
    assert operator["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

    redis_policy = find("NetworkPolicy", "secondstage-redis")["spec"]
    assert redis_policy["podSelector"]["matchLabels"] == {"app": "secondstage-redis"}
    [rule] = redis_policy["ingress"]
    [selector] = rule["from"]
    [allowed] = selector["podSelector"]["matchExpressions"]
    # Exactly the workloads configured with the Redis URL are let in.
    users = {
        pod_template(w)["metadata"]["labels"]["app"]
        for w in workloads()
        if any("SECONDSTAGE_REDIS_URL" in env_of(c) for c in pod_template(w)["spec"]["containers"])
    }
    assert (allowed["key"], allowed["operator"], set(allowed["values"])) == ("app", "In", users)


def test_align_is_never_retried_after_a_refusal() -> None:
    cron = find("CronJob", "secondstage-align")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    fail_job = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    no_retry = {code for r in fail_job for code in r["onExitCodes"]["values"]}
    # The codes `align run` gives a refused gate and a held lock (align/job.py), plus usage errors.
    assert no_retry == {EXIT_CODES["gate_failed"], EXIT_CODES["locked"], 2}
    assert 1 not in no_retry, "1 is a failed run: the Job should retry it"


def test_images_are_pinned() -> None:
    for w in workloads():
        for c in pod_template(w)["spec"]["containers"]:
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest", c["image"]
    redis = container(find("StatefulSet", "secondstage-redis"), "redis")
    assert redis["image"].count(".") == 2, "Redis by its full version (x.y.z)"
    assert "secretKeyRef" in str(redis["env"])


def test_every_secondstage_variable_in_the_manifests_is_a_setting() -> None:
    """A misspelt SECONDSTAGE_* variable would be ignored by the pods (serve warns at start; this fails first)."""
    from align.settings import AlignSettings
    from core.settings import known_env_names
    from serve.settings import ServeSettings

    known = known_env_names((ServeSettings, AlignSettings))
    used = {
        name
        for workload in workloads()
        for c in pod_template(workload)["spec"]["containers"]
        for name in env_of(c)
        if name.startswith("SECONDSTAGE_")
    }
    assert used, "the manifests configure secondstage through SECONDSTAGE_* variables"
    assert not used - known, f"not settings: {sorted(used - known)}"
