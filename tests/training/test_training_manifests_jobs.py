"""The training manifests' command lines and jobs: every command is a valid ``sdserve train`` command
line whose paths, bucket, GPUs and workers agree with the rest of the files, and the single-GPU Job,
the shared storage, the RayJob and the PyTorchJob each run it where and as they should."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from subprocess import list2cmdline

import pytest

from helpers.training_manifests import data_connection, gpus, pod_specs, the, top_manifest

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
