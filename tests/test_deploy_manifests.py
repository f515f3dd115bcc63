"""The deploy/ manifests, checked offline (no cluster): the core Kubernetes objects against the
API server's own OpenAPI schemas (bundled in kubernetes-validate, strict: an unknown field is an
error), and against this project, so that a probe, a setting, a port or the user id cannot drift
away from what the code and the Dockerfile really do. The KServe InferenceService and the
Kubeflow TFJob have no bundled schema: their structure is checked against the upstream Go types
(cited at each check), and their pod specs against the core Pod schema."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.api_keys import ApiKeyConfigError, read_key_file
from service.app import create_app
from service.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
CORE_MANIFESTS = ([K8S / name for name in ("configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml",
                                          "pdb.yaml", "secret.example.yaml", "database-secret.example.yaml")]
                  + [DEPLOY / "training" / "pvc.yaml"])
# The oldest Kubernetes minor still in common support, and the newest schema kubernetes-validate bundles
# (pinned, not latest_version(): a package upgrade must not silently change what is checked).
K8S_VERSIONS = ("1.30", "1.37")
SETTING_NAMES = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path}: one object a file"
    return docs[0]


def validate(obj: dict, version: str) -> str:
    """Strict schema validation; returns the schema version actually used."""
    return kubernetes_validate.validate(obj, version, strict=True)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in units.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * factor
    return float(q)


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users
    return users[-1]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load(K8S / "deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def configmap() -> dict:
    return load(K8S / "configmap.yaml")


@pytest.fixture(scope="module")
def app_paths() -> set[str]:
    """The paths the app really serves, from its OpenAPI document (building the app loads no model)."""
    return set(create_app(Settings(warmup=False)).openapi()["paths"])


# --- core manifests: the Kubernetes schemas -------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", CORE_MANIFESTS, ids=lambda p: p.name)
def test_core_manifest_validates_strictly(path, version):
    assert validate(load(path), version) == version  # the pinned schema exists, no silent fallback


def test_validator_rejects_a_broken_deployment(deployment):
    """The validator really runs: an unknown (misspelt) field, a wrong type and a missing required
    field each fail, so a pass above means something."""
    typo = copy.deepcopy(deployment)
    c = typo["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    missing = copy.deepcopy(deployment)
    del missing["spec"]["selector"]
    for broken in (typo, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken, K8S_VERSIONS[-1])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # an unknown kind is no pass either
        validate({**deployment, "kind": "Deploymnet"}, K8S_VERSIONS[-1])


# --- the Deployment against the code -------------------------------------------------------------

def test_probes_hit_routes_the_app_serves(container, app_paths):
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in probes.values():
        assert probe["path"] in app_paths
        assert probe["port"] in ports
    # the start-up budget covers a slow cold start (5-10 s warm) before liveness may kill the pod
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_probes_need_no_api_key_under_the_deployed_key_settings(configmap, app_paths, tmp_path):
    """The probes send no key: with the ConfigMap's key settings (keys from a file, /metrics open)
    the health routes must never answer 401."""
    key_file = tmp_path / "api-keys"
    key_file.write_text("a-real-key-0123456789\n")
    settings = Settings(api_keys_file=key_file, warmup=False,
                        metrics_require_key=configmap["data"]["CALIB_METRICS_REQUIRE_KEY"] == "true")
    client = TestClient(create_app(settings))  # no lifespan: no model loaded, so /health/ready is 503
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert client.get("/v1/models").status_code == 401  # ... while the data plane is keyed


def test_env_names_are_real_settings(container, configmap):
    calib = [name for name in configmap["data"] if name.startswith(ENV_PREFIX)]
    assert calib == list(configmap["data"]), "the ConfigMap holds service settings only"
    calib += [name for name in env_of(container) if name.startswith(ENV_PREFIX)]
    assert set(calib) <= SETTING_NAMES, set(calib) - SETTING_NAMES
    refs = [src["configMapRef"]["name"] for src in container["envFrom"]]
    assert refs == [configmap["metadata"]["name"]]


def test_configmap_values_parse_as_settings(configmap, monkeypatch, tmp_path):
    """Every value is one the service accepts (what `python -m service` would do at start-up)."""
    key_file = tmp_path / "api-keys"
    key_file.write_text("a-real-key-0123456789\n")
    for name, value in configmap["data"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CALIB_API_KEYS_FILE", str(key_file))  # stands in for the mounted Secret
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert len(settings.all_api_keys) == 1


def test_container_port_is_calib_port_and_the_service_targets_it(container, configmap):
    (port,) = container["ports"]
    assert port["containerPort"] == int(configmap["data"]["CALIB_PORT"])
    service = load(K8S / "service.yaml")
    (sport,) = service["spec"]["ports"]
    assert sport["port"] == 80 and sport["targetPort"] == port["name"]
    assert service["spec"]["type"] == "ClusterIP"


def test_api_key_file_is_the_mounted_secret(deployment, container, configmap):
    path = Path(configmap["data"]["CALIB_API_KEYS_FILE"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, v in volumes.items() if "secret" in v]
    secret = volumes[name]["secret"]
    assert mounts[name]["readOnly"] is True
    (item,) = secret["items"]
    assert path == Path(mounts[name]["mountPath"]) / item["path"]
    example = load(K8S / "secret.example.yaml")
    assert secret["secretName"] == example["metadata"]["name"]
    assert item["key"] in example["stringData"]


def test_example_secret_cannot_be_deployed_unchanged(tmp_path):
    """The placeholder is not a valid key: the service refuses to start rather than serve behind
    a key published in this repository."""
    example = load(K8S / "secret.example.yaml")
    (content,) = example["stringData"].values()
    path = tmp_path / "api-keys"
    path.write_text(content)
    with pytest.raises(ApiKeyConfigError, match="visible ASCII"):
        read_key_file(path)


def test_runs_as_the_dockerfile_user_locked_down(deployment, container):
    uid = int(dockerfile_user())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"] == uid == 10001
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["enableServiceLinks"] is False  # no <SERVICE>_PORT=tcp://... next to the CALIB_ settings


def test_writable_tmp_for_a_read_only_root(deployment, container):
    """With a read-only root, /tmp (multipart spooling, tempfile) must be a volume, and the
    matplotlib and Keras config dirs must live under it."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = env_of(container)
    for name in ("MPLCONFIGDIR", "KERAS_HOME"):
        assert env[name]["value"].startswith("/tmp/")
    assert "MPLCONFIGDIR=/tmp/matplotlib" in (REPO / "Dockerfile").read_text()


def test_resources_fit_the_measured_footprint(container):
    """reports/soak-test.md: ~1.1 GB idle, 1.32 GB peak under overload, < 2 GB bound by admission."""
    res = container["resources"]
    assert quantity_bytes(res["requests"]["memory"]) >= 1.3e9
    assert quantity_bytes(res["limits"]["memory"]) >= 2.0e9
    assert res["requests"]["cpu"] == res["limits"]["cpu"]
    env = env_of(container)  # thread pools follow the CPU limit, not the node's core count
    for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        assert env[name]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


def test_hpa_pdb_and_service_select_the_deployment(deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    hpa, pdb, service = (load(K8S / f) for f in ("hpa.yaml", "pdb.yaml", "service.yaml"))
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always proceed
    assert service["spec"]["selector"].items() <= labels.items()


def test_database_url_comes_from_the_example_database_secret(container, isvc):
    """Both pod specs read CALIB_DATABASE_URL from the Secret that database-secret.example.yaml
    describes, and its placeholder is a PostgreSQL URL the settings accept."""
    from service.storage.engine import backend_of

    example = load(K8S / "database-secret.example.yaml")
    for c in (container, isvc["spec"]["predictor"]["containers"][0]):
        ref = env_of(c)["CALIB_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == example["metadata"]["name"] and ref["key"] in example["stringData"]
    assert backend_of(example["stringData"]["url"]) == "postgresql"
    Settings(database_url=example["stringData"]["url"])


def test_kustomization_lists_the_manifests_but_not_the_example_secret(container):
    kustomization = load(K8S / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in CORE_MANIFESTS if p.parent == K8S} - {"secret.example.yaml",
                                                                            "database-secret.example.yaml"}
    (image,) = kustomization["images"]
    assert image["name"] == container["image"]


# --- KServe InferenceService -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def isvc() -> dict:
    return load(DEPLOY / "kserve" / "inferenceservice.yaml")


# ComponentExtensionSpec fields (kserve/kserve pkg/apis/serving/v1beta1/component.go), inlined into
# PredictorSpec next to the inlined PodSpec (predictor.go); everything else must be PodSpec.
KSERVE_EXTENSION_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy"}
# The built-in predictors of PredictorSpec (predictor.go): "exactly one" implementation, and
# `containers` makes it the custom one, so none of these may appear.
KSERVE_BUILTIN_PREDICTORS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface",
                             "pmml", "lightgbm", "paddle", "model", "storageUris", "workerSpec"}


def test_inferenceservice_is_a_v2_custom_predictor(isvc, app_paths):
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    # component.go InvalidISVCNameFormatError: lower case alphanumerics or '-', starting with a letter
    assert DNS_1035_LABEL.fullmatch(isvc["metadata"]["name"])
    predictor = isvc["spec"]["predictor"]  # InferenceServiceSpec.Predictor is required
    assert not set(predictor) & KSERVE_BUILTIN_PREDICTORS
    assert 0 <= predictor["minReplicas"] <= predictor["maxReplicas"]  # component.go validateReplicas
    # pkg/constants/constants.go: InferenceServiceContainerName, CustomSpecProtocolEnvVarKey, ProtocolV2
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container" and c["image"]
    env = env_of(c)
    assert env["PROTOCOL"]["value"] == "v2"
    # InferenceServiceDefaultHttpPort: KServe sends traffic to 8080
    (port,) = c["ports"]
    assert port["containerPort"] == int(env["CALIB_PORT"]["value"]) == 8080
    calib = {name for name in env if name.startswith(ENV_PREFIX)}
    assert calib <= SETTING_NAMES, calib - SETTING_NAMES
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[name]["httpGet"]
        assert probe["path"] in app_paths and probe["port"] == 8080
        assert probe["path"].startswith("/v2/health/")   # the protocol KServe speaks to it
    assert c["securityContext"]["runAsUser"] == predictor["securityContext"]["runAsUser"] == int(dockerfile_user())
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_inferenceservice_pod_spec_is_a_valid_pod_spec(isvc, version):
    pod_spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in KSERVE_EXTENSION_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    assert validate(pod, version) == version


# --- Kubeflow TFJob --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfjob() -> dict:
    return load(DEPLOY / "training" / "tfjob.yaml")


def test_tfjob_structure(tfjob):
    """kubeflow/training-operator pkg/apis/kubeflow.org/v1: tensorflow_types.go (TFJobSpec, replica
    types), common_types.go (ReplicaSpec, RestartPolicy, RunPolicy), tensorflow_validation.go
    (DNS-1035 name, a container named "tensorflow" with an image in every replica spec, <= 1 chief)."""
    assert (tfjob["apiVersion"], tfjob["kind"]) == ("kubeflow.org/v1", "TFJob")
    assert DNS_1035_LABEL.fullmatch(tfjob["metadata"]["name"])
    spec = tfjob["spec"]
    assert set(spec) <= {"runPolicy", "successPolicy", "tfReplicaSpecs", "enableDynamicWorker"}
    assert set(spec["runPolicy"]) <= {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                                      "backoffLimit", "schedulingPolicy"}
    assert spec["runPolicy"].get("cleanPodPolicy", "None") in {"All", "Running", "None"}
    replicas = spec["tfReplicaSpecs"]
    assert set(replicas) <= {"PS", "Worker", "Chief", "Master", "Evaluator"}
    assert sum(r in replicas for r in ("Chief", "Master")) <= 1
    assert replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        assert set(replica) <= {"replicas", "template", "restartPolicy"}
        assert replica["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        containers = replica["template"]["spec"]["containers"]
        assert all(c.get("image") for c in containers)
        assert [c["name"] for c in containers].count("tensorflow") == 1


def test_tfjob_worker_runs_distributed_training_on_the_shared_volume(tfjob):
    pod = tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    cmd = c["command"] + c["args"]
    assert cmd[:3] == ["python", "-m", "training.train"] and "--distributed" in cmd
    assert {"name": "tfjob-port", "containerPort": 2222, "protocol": "TCP"} in c["ports"]  # TFJobDefaultPort
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shared,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    pvc = load(DEPLOY / "training" / "pvc.yaml")
    assert volumes[shared]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # both workers mount it
    for flag in ("--data", "--output"):
        assert cmd[cmd.index(flag) + 1].startswith(mounts[shared] + "/")
    assert c["securityContext"]["runAsUser"] == int(dockerfile_user())
    assert "emptyDir" in volumes[{v: k for k, v in mounts.items()}["/tmp"]]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_tfjob_pod_template_is_a_valid_pod_template(tfjob, version):
    for replica in tfjob["spec"]["tfReplicaSpecs"].values():
        obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "worker"},
               "template": replica["template"]}
        assert validate(obj, version) == version
