"""The training manifests in manifests/training/: the RayJob and the PyTorchJob are checked against
KubeRay's and the training operator's CRDs the way ``kubectl apply --validate=strict`` checks them,
the plain Job, Pod and PVC against the core shapes (their pod templates against the PodTemplateSpec
schema the CRDs embed), and every command is a valid ``sdserve train`` command line whose paths,
bucket, GPUs and workers agree with the rest of the files."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path
from subprocess import list2cmdline

import jsonschema
import pytest
import yaml
from crd_schema import CRDS, OBJECT_META, YAML_LOADER, schema_errors, strict, with_value

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "manifests" / "training"

# `sdserve train`'s flags (issue 15): taking a value, and switches.
TRAIN_VALUE_FLAGS = {
    "--model_dir", "--images", "--instance_prompt", "--name", "--output", "--class_prompt", "--num_class_images",
    "--prior_loss_weight", "--resolution", "--max_train_steps", "--train_batch_size",
    "--gradient_accumulation_steps", "--learning_rate", "--rank", "--alpha", "--mixed_precision",
    "--checkpointing_steps", "--work_dir", "--validation_prompt", "--validation_steps", "--seed", "--ray_workers",
    "--ray_address",
}
TRAIN_SWITCHES = {"--train_text_encoder", "--no_gradient_checkpointing", "--use_8bit_adam", "--resume", "--ray_use_gpu"}
TRAIN_REQUIRED = {"--model_dir", "--images", "--instance_prompt", "--name", "--output"}
BUCKET = "test-bucket"  # stands in for the data connection's AWS_S3_BUCKET
LOCAL_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


# --- loading -------------------------------------------------------------------------------------

@functools.cache
def training_files() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
            for path in sorted(TRAINING.glob("*.yaml"))}


def the(kind: str, file: str) -> dict:
    (obj,) = [doc for doc in training_files()[file] if doc["kind"] == kind]
    return obj


def top_manifest(kind: str, file: str) -> dict:
    (obj,) = [doc for doc in yaml.safe_load_all((ROOT / "manifests" / file).read_text()) if doc["kind"] == kind]
    return obj


def data_connection() -> dict:
    return top_manifest("Secret", "data-connection.yaml")


def pod_specs() -> list[tuple[str, dict]]:
    """(where, PodSpec) of every pod the training manifests make."""
    job, ray, torch = the("Job", "job.yaml"), the("RayJob", "rayjob.yaml"), the("PyTorchJob", "pytorchjob.yaml")
    found = [("job", job["spec"]["template"]["spec"]), ("upload", the("Pod", "storage.yaml")["spec"]),
             ("ray head", ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])]
    found += [(f"ray {group['groupName']}", group["template"]["spec"])
              for group in ray["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    found += [(f"pytorch {kind}", spec["template"]["spec"]) for kind, spec in torch["spec"]["pytorchReplicaSpecs"].items()]
    return found


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# --- core shapes (no CRD): Job, Pod, PVC, with the PodTemplateSpec schema the CRDs embed ----------

@functools.cache
def pod_template_schema() -> dict:
    """core/v1 PodTemplateSpec as the training operator's CRD embeds it, strict."""
    if not CRDS.is_dir():
        pytest.skip(f"the CRDs are not at {CRDS} (../shared/crds beside the repository)")
    crd = yaml.load((CRDS / "kubeflow.org_pytorchjobs.yaml").read_text(), Loader=YAML_LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return strict(spec["pytorchReplicaSpecs"]["additionalProperties"]["properties"]["template"])


INT = {"type": "integer"}
QUANTITY = {"type": "string", "pattern": r"^\d+(\.\d+)?([KMGTPE]i?|m)?$"}


def core_schema(kind: str) -> dict:
    def obj(required: list[str], properties: dict) -> dict:
        return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}

    if kind == "Job":  # batch/v1 JobSpec, the fields a training Job uses and a few neighbours
        rule = obj(["action"], {
            "action": {"enum": ["FailJob", "FailIndex", "Ignore", "Count"]},
            "onExitCodes": obj(["operator", "values"], {
                "containerName": {"type": "string"}, "operator": {"enum": ["In", "NotIn"]},
                "values": {"type": "array", "items": INT, "minItems": 1}}),
            "onPodConditions": {"type": "array", "items": obj(["type"], {
                "type": {"type": "string"}, "status": {"enum": ["True", "False", "Unknown"]}})},
        })
        spec = obj(["template"], {
            "template": pod_template_schema(), "backoffLimit": INT, "activeDeadlineSeconds": INT,
            "ttlSecondsAfterFinished": INT, "completions": INT, "parallelism": INT, "suspend": {"type": "boolean"},
            "podFailurePolicy": obj(["rules"], {"rules": {"type": "array", "items": rule}}),
        })
        api = "batch/v1"
    elif kind == "Pod":
        spec, api = pod_template_schema()["properties"]["spec"], "v1"
    elif kind == "PersistentVolumeClaim":
        spec = obj(["accessModes", "resources"], {
            "accessModes": {"type": "array", "minItems": 1,
                            "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "resources": obj(["requests"], {"requests": obj(["storage"], {"storage": QUANTITY})}),
            "storageClassName": {"type": "string"}, "volumeMode": {"enum": ["Filesystem", "Block"]},
        })
        api = "v1"
    else:
        raise AssertionError(f"no core schema for {kind}")
    return obj(["apiVersion", "kind", "metadata", "spec"], {
        "apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": OBJECT_META, "spec": spec})


def errors(obj: dict) -> list[str]:
    """Schema errors of any object in these files: CRD kinds by their CRD, core kinds by core_schema."""
    if obj["kind"] in ("RayJob", "PyTorchJob"):
        return schema_errors(obj)
    validator = jsonschema.Draft7Validator(core_schema(obj["kind"]))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(obj))


# --- every file, and the schemas -----------------------------------------------------------------

def test_training_files_hold_the_expected_objects():
    kinds = {name: sorted(doc["kind"] for doc in docs) for name, docs in training_files().items()}
    assert kinds == {
        "job.yaml": ["Job"],
        "pytorchjob.yaml": ["PyTorchJob"],
        "rayjob.yaml": ["RayJob"],
        "storage.yaml": ["PersistentVolumeClaim", "Pod"],
    }


OBJECTS = [(f"{name}:{doc['kind']}", doc) for name, docs in training_files().items() for doc in docs]


@pytest.mark.parametrize("where, obj", OBJECTS, ids=[where for where, _ in OBJECTS])
def test_training_objects_validate_strictly(where, obj):
    assert errors(obj) == []


@pytest.mark.parametrize("file, kind, path, value, expected", [
    ("rayjob.yaml", "RayJob", "spec.shutdownAfterJobFinish", True, "'shutdownAfterJobFinish' was unexpected"),
    ("rayjob.yaml", "RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.replicas", "2", "'2' is not of type 'integer'"),
    ("rayjob.yaml", "RayJob", "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus", 0,
     "0 is not of type 'string'"),
    ("pytorchjob.yaml", "PyTorchJob", "spec.pytorchReplicaSpecs.Master.template.spec.containers.0.comand", [],
     "'comand' was unexpected"),
    ("pytorchjob.yaml", "PyTorchJob", "spec.nprocPerNode", 1, "1 is not of type 'string'"),
    ("job.yaml", "Job", "spec.backofLimit", 3, "'backofLimit' was unexpected"),
    ("job.yaml", "Job", "spec.template.spec.containers.0.args", "train", "'train' is not of type 'array'"),
    ("job.yaml", "Job", "spec.template.spec.volumes.0.persistentVolumeClaim.claim", "x", "'claim' was unexpected"),
    ("storage.yaml", "PersistentVolumeClaim", "spec.accessModes", ["ReadWriteAll"], "'ReadWriteAll' is not one of"),
    ("storage.yaml", "Pod", "spec.containers.0.securityContext.runAsNonroot", True, "'runAsNonroot' was unexpected"),
])
def test_the_validators_reject_unknown_fields_and_wrong_types(file, kind, path, value, expected):
    found = errors(with_value(the(kind, file), path, value))
    assert any(expected in error for error in found), found


def test_training_manifests_are_not_deployed_with_the_model_server():
    kustomization = top_manifest("Kustomization", "kustomization.yaml")
    assert not any(resource.startswith("training") for resource in kustomization["resources"])


def test_no_training_manifest_holds_something_like_a_real_credential():
    for path in sorted(TRAINING.glob("*.yaml")):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        assert not re.search(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", text), path.name


# --- the command lines ---------------------------------------------------------------------------

def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args; every VAR must be in the container's env."""
    def value(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not in the container's environment"
        return env[match.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, text)


def connection_env() -> dict[str, str]:
    return {**dict.fromkeys(data_connection()["stringData"], "x"), "AWS_S3_BUCKET": BUCKET}


def train_argv(file: str) -> list[str]:
    """The arguments after `sdserve train`, as the process receives them."""
    if file == "job.yaml":
        (container,) = the("Job", file)["spec"]["template"]["spec"]["containers"]
        assert "command" not in container, "the image's ENTRYPOINT (python -m sdserve) runs it"
        argv = [k8s_expand(arg, connection_env()) for arg in container["args"]]
        assert argv[0] == "train"
        return argv[1:]
    if file == "pytorchjob.yaml":
        (container,) = the("PyTorchJob", file)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        argv = [k8s_expand(arg, connection_env()) for arg in container["command"]]
        start = argv.index("-m")
        assert argv[:1] == ["torchrun"] and argv[start + 1 : start + 3] == ["sdserve", "train"]
        return argv[start + 3 :]
    if file == "rayjob.yaml":
        tokens = shlex.split(the("RayJob", file)["spec"]["entrypoint"])  # the submitter's shell
        assert tokens[:4] == ["python", "-m", "sdserve", "train"]
        return [token.replace("${AWS_S3_BUCKET}", BUCKET) for token in tokens[4:]]  # the driver's shell
    raise AssertionError(file)


def flags(argv: list[str]) -> dict[str, str | bool]:
    """--flag=value, --flag value and switches, each checked against sdserve train's flags."""
    found: dict[str, str | bool] = {}
    items = iter(argv)
    for item in items:
        name, eq, value = item.partition("=")
        assert name in TRAIN_VALUE_FLAGS | TRAIN_SWITCHES, f"{name} is not an sdserve train flag"
        assert name not in found, f"{name} given twice"
        if name in TRAIN_SWITCHES:
            assert not eq, f"{name} takes no value"
            found[name] = True
        else:
            found[name] = value if eq else next(items)
    return found


COMMAND_FILES = ["job.yaml", "rayjob.yaml", "pytorchjob.yaml"]


def mount_of_claim(spec: dict, claim: str) -> str:
    (volume,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    (mount,) = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
    return mount["mountPath"]


@pytest.mark.parametrize("file", COMMAND_FILES)
def test_commands_are_sdserve_train_with_its_flags(file):
    given = flags(train_argv(file))
    assert TRAIN_REQUIRED <= set(given)
    assert given.get("--resume") is True, "a retried pod (or RayJob) must continue from its checkpoint"
    assert int(given.get("--checkpointing_steps", 100)) > 0
    # The model the InferenceService serves (its storage path in the same bucket), base/ only.
    storage_path = top_manifest("InferenceService", "inferenceservice-raw.yaml")["spec"]["predictor"]["model"]["storage"]["path"]
    assert given["--model_dir"] == f"s3://{BUCKET}/{storage_path}/base/"
    assert re.fullmatch(rf"s3://{BUCKET}/[\w/-]+/", given["--output"]), "adapters go to the bucket servers read"
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", given["--name"])
    assert given["--instance_prompt"].strip()


@pytest.mark.parametrize("file", COMMAND_FILES)
def test_the_training_cli_parses_the_commands(file):
    """With `sdserve train` installed, its own parser and its input checks (those that need no
    files) accept every command line."""
    options = pytest.importorskip("sdserve.training.options")
    argv = train_argv(file)
    try:
        opts, _ = options.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"sdserve train rejects {argv}: exit status {exc.code}")
    options.check_name(opts.name)
    options.check_output(opts.output)
    options.check_flags(opts)
    assert opts.resume and opts.name == flags(argv)["--name"]


@pytest.mark.parametrize("file", COMMAND_FILES)
def test_images_and_work_folder_are_on_the_training_volume(file):
    given = flags(train_argv(file))
    claim = the("PersistentVolumeClaim", "storage.yaml")["metadata"]["name"]
    specs = {"job.yaml": ["job"], "rayjob.yaml": ["ray head", "ray gpu"],
             "pytorchjob.yaml": ["pytorch Master", "pytorch Worker"]}[file]
    for where, spec in pod_specs():
        if where in specs:
            root = mount_of_claim(spec, claim)
            for flag in ("--images", "--work_dir"):
                assert Path(given[flag]).is_relative_to(root), f"{where}: {flag} {given[flag]} is not under {root}"
    # the upload pod puts the images where the jobs read them
    upload_root = mount_of_claim(the("Pod", "storage.yaml")["spec"], claim)
    assert Path(given["--images"]).parent == Path(upload_root) / "images"


def test_every_pod_gets_the_data_connection_and_the_same_image():
    secret = data_connection()["metadata"]["name"]
    images = set()
    for where, spec in pod_specs():
        for container in spec["containers"]:
            images.add(container["image"])
            if where != "upload":
                assert {"secretRef": {"name": secret}} in container.get("envFrom", []), where
    (image,) = images
    assert image.startswith("registry.example.com/sdserve-train:"), "a CHANGE ME placeholder, one image"


def image_cache_dir() -> str:
    """XDG_CACHE_HOME as the Containerfile sets it (the model download goes below it)."""
    text = (ROOT / "Containerfile").read_text()
    return re.search(r"XDG_CACHE_HOME=(\S+)", text).group(1)


def test_pods_run_under_the_restricted_scc_with_writable_caches():
    cache = image_cache_dir()
    for where, spec in pod_specs():
        assert "securityContext" not in spec or "runAsUser" not in spec["securityContext"], where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert "runAsUser" not in context, f"{where}: OpenShift picks the UID"
            assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"] and context["seccompProfile"]["type"] == "RuntimeDefault"
            if where == "upload":
                continue
            # the model download cache on a volume: XDG_CACHE_HOME pointed at one, or one mounted at the image's
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            target = env.get("XDG_CACHE_HOME", cache)
            assert any(Path(target).is_relative_to(mount) for mount in mounts), f"{where}: {target} is not on a volume"
            assert "/dev/shm" in mounts, f"{where}: PyTorch needs more than the default 64 MiB of shared memory"


def test_gpu_pods_tolerate_the_gpu_taint_and_request_what_they_limit():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for where, spec in pod_specs():
        for container in spec["containers"]:
            if gpus(container):
                assert toleration in spec.get("tolerations", []), where
                assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus(container), where


# --- the single-GPU Job --------------------------------------------------------------------------

def test_job_trains_on_one_gpu_and_retries_all_but_usage_errors():
    job = the("Job", "job.yaml")
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert gpus(container) == 1
    assert "--ray_workers" not in flags(train_argv("job.yaml"))
    assert spec["backoffLimit"] >= 1 and spec["template"]["spec"]["restartPolicy"] == "Never"
    (fail, ignore) = spec["podFailurePolicy"]["rules"]
    # argparse's exit status: a usage error fails the Job at once
    assert fail == {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In", "values": [2]}}
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert spec["activeDeadlineSeconds"] > 3600 and spec["ttlSecondsAfterFinished"] > 0


def test_storage_is_shared_between_nodes_and_big_enough():
    pvc = the("PersistentVolumeClaim", "storage.yaml")["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"], "Ray and PyTorchJob pods on several nodes share it"
    assert re.fullmatch(r"(\d+)Gi", pvc["resources"]["requests"]["storage"])
    assert int(pvc["resources"]["requests"]["storage"][:-2]) >= 20  # SDXL base download + checkpoints
    pod = the("Pod", "storage.yaml")["spec"]
    assert pod["restartPolicy"] == "Never" and not gpus(pod["containers"][0])


# --- the RayJob ----------------------------------------------------------------------------------

def unquoted_dollars(text: str) -> list[int]:
    """Positions of $ that a POSIX shell would expand (outside single quotes)."""
    found, quoted = [], False
    for i, char in enumerate(text):
        if char == "'":
            quoted = not quoted
        elif char == "$" and not quoted:
            found.append(i)
    return found


def test_rayjob_entrypoint_survives_the_submitter_and_the_driver_shells():
    entrypoint = the("RayJob", "rayjob.yaml")["spec"]["entrypoint"]
    # KubeRay's submitter runs `ray job submit ... -- <entrypoint>` in a shell without the data
    # connection: nothing may be expanded there.
    assert unquoted_dollars(entrypoint) == []
    tokens = shlex.split(entrypoint)
    # What reaches the driver still names the data connection's variables, which the head's env has.
    for name in re.findall(r"\$\{(\w+)\}", " ".join(tokens)):
        assert name in data_connection()["stringData"], name
    # `ray job submit` joins the words with subprocess.list2cmdline; the driver's shell splits them again.
    assert shlex.split(list2cmdline(tokens)) == tokens


def test_rayjob_trains_on_its_gpu_workers_and_frees_them_at_the_end():
    rayjob = the("RayJob", "rayjob.yaml")
    spec = rayjob["spec"]
    assert rayjob["metadata"]["labels"][LOCAL_QUEUE_LABEL]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # what the entrypoint's quoting assumes
    assert "clusterSelector" not in spec, "Kueue manages the cluster the RayJob creates"
    cluster = spec["rayClusterSpec"]
    assert not cluster.get("enableInTreeAutoscaling"), "Kueue admits a fixed size"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and not gpus(head["template"]["spec"]["containers"][0])
    given = flags(train_argv("rayjob.yaml"))
    workers = gpu_workers = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        per_pod = gpus(group["template"]["spec"]["containers"][0])
        workers += group["replicas"]
        gpu_workers += group["replicas"] * per_pod
        assert per_pod in (0, 1), "one Ray Train worker per GPU pod"
    assert int(given["--ray_workers"]) == workers == gpu_workers
    assert given["--ray_use_gpu"] is True
    assert "--ray_address" not in given, "the job's RAY_ADDRESS points at its own cluster"


def test_rayjob_head_and_workers_share_the_volume_at_the_same_path():
    claim = the("PersistentVolumeClaim", "storage.yaml")["metadata"]["name"]
    paths = {mount_of_claim(spec, claim) for where, spec in pod_specs() if where.startswith("ray ")}
    assert len(paths) == 1


# --- the PyTorchJob ------------------------------------------------------------------------------

def torchrun_args(container: dict) -> dict[str, str]:
    command = container["command"]
    start = command.index("-m")
    return dict(arg.removeprefix("--").split("=", 1) for arg in command[1:start])


def test_pytorchjob_runs_torchrun_in_a_master_and_workers():
    job = the("PyTorchJob", "pytorchjob.yaml")
    assert job["metadata"]["labels"][LOCAL_QUEUE_LABEL]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    for kind, replica in replicas.items():
        assert replica["restartPolicy"] in ("OnFailure", "ExitCode"), kind
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch", "the training operator looks for this container"
        # torchrun's processes per pod = the operator's nprocPerNode (its WORLD_SIZE) = the pod's GPUs
        assert torchrun_args(container) == {"nproc_per_node": job["spec"]["nprocPerNode"]}
        assert int(job["spec"]["nprocPerNode"]) == gpus(container) == 1
        # no rendezvous flags: torchrun takes the operator's PET_MASTER_ADDR/PORT, PET_NNODES, PET_NODE_RANK
        assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] in ("Running", "All"), "no pod keeps a GPU after the end"
