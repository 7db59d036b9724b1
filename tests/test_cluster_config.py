"""cluster.yaml is a valid Ray cluster-launcher config (schema shipped inside ray)."""

import json
import os

import jsonschema
import ray
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_validates_against_rays_own_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert {"head.cpu", "worker.cpu", "worker.gpu"} == set(types)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # Never a public dashboard.


def test_the_rayjob_entrypoint_names_a_module_and_config_that_exist():
    import importlib.util
    import shlex

    from pipelines import hubert

    with open(os.path.join(REPO, "k8s", "rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "pipelines.hubert"]
    assert importlib.util.find_spec(words[2]) is not None
    config = words[words.index("--config") + 1]
    assert config.startswith("/app/")  # The image's copy of this repository (Dockerfile).
    local = os.path.join(REPO, config[len("/app/") :])
    overrides = words[words.index("--config") + 2 :]
    loaded = hubert.load_config(local, overrides)  # Every override names a known key.
    assert loaded["root"].startswith("/data") and loaded["inputs"]
    with open(os.path.join(REPO, "Dockerfile")) as f:
        dockerfile = f.read()
    assert "COPY" in dockerfile and "/app" in dockerfile and "[gpu,models,s3]" in dockerfile
    cluster = job["spec"]["rayClusterSpec"]
    assert f"rayproject/ray:{cluster['rayVersion']}-" in dockerfile  # Operator = image.
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"  # No public dashboard.
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in str(groups["cpu"])
    images = {c["image"] for g in [cluster["headGroupSpec"], *groups.values()]
              for c in g["template"]["spec"]["containers"]}  # fmt: skip
    assert len(images) == 1  # One image everywhere.


def test_the_clusters_preload_what_a_local_ray_preloads():
    import importlib.util
    import shlex

    from pipelines._ray import WORKER_PRELOAD

    with open(os.path.join(REPO, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    words = shlex.split(" ".join(config["head_start_ray_commands"]))
    (option,) = [w for w in words if w.startswith("--system-config=")]
    preload = json.loads(option.partition("=")[2])["preload_python_modules"]
    assert tuple(preload) == WORKER_PRELOAD
    assert all(importlib.util.find_spec(name) is not None for name in preload)
    with open(os.path.join(REPO, "k8s", "rayjob.yaml")) as f:
        head = yaml.safe_load(f)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert tuple(json.loads(head["system-config"])["preload_python_modules"]) == WORKER_PRELOAD
