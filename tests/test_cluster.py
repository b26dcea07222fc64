"""The cluster path: a sweep submitted to a real 2-node Ray cluster on loopback (cluster/local.py), a node
lost mid-sweep, and the launcher / KubeRay / SLURM files the docs rely on.

The local cluster's head has no CPUs, so every trial runs on one of the two worker nodes (1 CPU each),
as on a cluster whose head only schedules. Which node runs what is forced, never left to the scheduler's
timing: a trial waits at its first step until two trials have started (the faulty rule's barrier), and
with one trial per node the second can only start on the other node.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from bioplaus.cluster.local import LocalCluster
from conftest import faulty_rule_everywhere
from bioplaus.orchestrator import ray_local
from bioplaus.orchestrator.sweep import Sweep, parse_sweep

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"
# Fully deterministic tuning: no ASHA stop (grace = max epochs) and fewer trials than TPE's random start-up,
# so the same seeds give the same trials wherever they run. faulty = backprop.
SAME_EVERYWHERE = ["preset=smoke", "rules=[faulty]", "budget.trials=4", "budget.epochs=2", "budget.grace_epochs=2",
                   "budget.final_seeds=2", "resources.cpus_per_trial=1"]


def two_at_once(started: Path) -> list[str]:
    """Overrides that hold every trial at its first step until two trials have started (a file each in
    ``started``): the first cannot finish before the second starts, which on one-CPU nodes is elsewhere."""
    started.mkdir(exist_ok=True)
    return [f"trial.hp.started_dir={started}", "trial.hp.wait_for_started=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_ray):
    """Head (0 CPUs) + 2 worker nodes (1 CPU each) on 127.0.0.1; Ray workers load the faulty rule too. The
    sweeps here join it, or start a Ray of their own: the session's shared one is stopped first."""
    shared_ray.down()
    with faulty_rule_everywhere(), LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, cpus_per_worker=1,
                                                head_cpus=0) as c:
        yield c


def run_sweep(root: Path, *overrides: str) -> Sweep:
    s = Sweep(parse_sweep([*SAME_EVERYWHERE, f"root={root}", "name=s", *overrides]))
    s.run(log=lambda m: None)
    return s


@pytest.mark.slow
def test_sweep_on_two_nodes_uses_both_and_matches_the_single_node_run(cluster, tmp_path):
    # The same trial.hp in both runs (hp_json is compared); the single-node run finds the barrier already met.
    barrier = two_at_once(tmp_path / "started")
    on_cluster = run_sweep(tmp_path / "cluster", f"ray.address={cluster.address}", *barrier)
    trials, finals = on_cluster.table("trials"), on_cluster.table("final_runs")
    assert trials.height == 4 and set(trials["status"]) == {"ok"}
    assert set(trials["node_id"]) == set(cluster.worker_node_ids())  # both worker nodes ran trials
    assert set(finals["node_id"]) <= set(cluster.worker_node_ids())
    assert len(list((on_cluster.dir / "models").glob("*.pt"))) == 2  # sent back to the driver, written there

    single = run_sweep(tmp_path / "single", "ray.num_cpus=2", *barrier)
    one = single.table("trials")
    assert one["node_id"].n_unique() == 1
    by_number = lambda df: df.sort("trial_number").select("trial_number", "hp_json", "val_acc")
    assert by_number(trials).equals(by_number(one))  # same seeds, same trials, same numbers
    key = ["rule", "arch", "dataset"]
    cols = [*key, "best_trial_number", "hp_json", "test_acc_mean", "test_acc_std"]
    assert on_cluster.table("finals").select(cols).equals(single.table("finals").select(cols))
    assert pl.read_parquet(on_cluster.dir / "manifest.parquet")["status"][0] == "complete"


@pytest.mark.slow
def test_killed_worker_node_mid_sweep_its_trials_rerun_on_the_survivor(cluster, tmp_path):
    survivor, victim = cluster.nodes[0].node_id, cluster.nodes[-1].node_id
    hung = tmp_path / "hung"
    # Both nodes get a trial (the barrier); the victim's hangs at its first step until the node is killed,
    # so the kill always lands on a busy node, however slowly anything here runs.
    overrides = [*two_at_once(tmp_path / "started"), "trial.hp.hang_at_step=1", f"trial.hp.hang_on_node={victim}",
                 f"trial.hp.hang_once_marker={hung}", "retries=3", "budget.final_seeds=1",
                 f"ray.address={cluster.address}"]
    killed = {}

    def kill_the_victim_while_it_trains():
        deadline = time.monotonic() + 600  # a guard: the sweep cannot finish before the kill
        while time.monotonic() < deadline and not hung.exists():
            time.sleep(0.1)
        killed["node"] = cluster.kill_worker(len(cluster.nodes) - 1)  # every process of the node, SIGKILL

    killer = threading.Thread(target=kill_the_victim_while_it_trains, daemon=True)
    killer.start()
    try:
        s = run_sweep(tmp_path, *overrides)
        killer.join(timeout=60)
        assert killed.get("node") == victim, "the node was not killed during the sweep"
        trials, epochs, finals = s.table("trials"), s.table("epochs"), s.table("final_runs")
        assert sorted(trials["trial_number"].to_list()) == [0, 1, 2, 3]  # nothing lost, nothing twice
        assert set(trials["status"]) <= {"ok", "pruned"}, trials.select("trial_number", "status", "error")
        assert trials["run_id"].n_unique() == 4
        assert epochs.group_by("run_id", "epoch", "phase").len()["len"].max() == 1  # no epoch row twice
        retried = trials.filter(pl.col("attempts") > 1)
        assert retried.height >= 1  # the lost node's trial ...
        assert set(retried["node_id"]) == {survivor}  # ... was run again, to the end, on the survivor
        assert finals.height == 1 and finals["node_id"][0] == survivor
    finally:
        if len(cluster.nodes) < 2:
            cluster.add_worker()  # the module's other tests get two workers again


def test_cluster_address_rules_keep_loopback_clusters_on_loopback():
    assert ray_local.is_loopback(None) and ray_local.is_loopback("local")
    assert ray_local.is_loopback("127.0.0.1:6379") and ray_local.is_loopback("localhost:6379")
    assert not ray_local.is_loopback("auto") and not ray_local.is_loopback("10.0.0.5:6379")
    assert not ray_local.is_loopback("ray://head.example:10001")


def test_local_cluster_command_prints_its_address_and_cleans_up_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bioplaus.cluster.local", "--workers", "1", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        first = proc.stdout.readline()
        assert re.match(r"local cluster up: head \+ 1 workers at 127\.0\.0\.1:\d+$", first.strip()), first
        raylets = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "raylet"], capture_output=True, text=True, check=False)
        assert len(raylets.stdout.split()) == 2  # head + 1 worker, in the command's own session
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
        # The nodes' processes were told to stop; wait until they are gone (a guard, not a measured delay).
        deadline, left = time.monotonic() + 120, ["?"]
        while left and time.monotonic() < deadline:
            left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True,
                                  check=False).stdout.split()
            time.sleep(0.2)
        assert not left, f"Ray processes left behind: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# --- the launcher files ------------------------------------------------------------------------------------
def test_ray_up_config_validates_against_rays_own_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before it launches anything
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["gpus"] = 1  # a typo `ray up` must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] > gpu["min_workers"]  # autoscaling GPU workers
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "bioplaus" in setup and "BIOPLAUS_DATA" in setup
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_kuberay_manifest_has_the_fields_the_docs_rely_on():
    docs = list(yaml.safe_load_all((CLUSTER_DIR / "kuberay.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"].startswith("ray.io/")
    assert "bioplaus sweep" in job["spec"]["entrypoint"] and "ray.address=auto" in job["spec"]["entrypoint"]
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["maxReplicas"] >= gpu[0]["minReplicas"]
    mounts = {m["mountPath"] for g in [spec["headGroupSpec"], *groups]
              for m in g["template"]["spec"]["containers"][0].get("volumeMounts", [])}
    assert "/shared" in mounts  # sweep folder, Optuna journal and data on one shared volume
    assert any(d["kind"] == "PersistentVolumeClaim" for d in docs)
    assert head["image"] == gpu[0]["template"]["spec"]["containers"][0]["image"]


def test_slurm_script_parses_and_starts_head_workers_and_the_sweep():
    text = (CLUSTER_DIR / "slurm.sbatch").read_text().replace("\\\n", " ")  # join continued lines
    assert subprocess.run(["bash", "-n", str(CLUSTER_DIR / "slurm.sbatch")], check=False).returncode == 0
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
    assert {"nodes", "gpus-per-node", "time", "job-name"} <= set(directives)
    assert re.search(r"srun .*--nodelist=\"?\$head_node\"?.* ray start --head", text)
    assert re.search(r"srun .*--exclude=\"?\$head_node\"?.* ray start --address", text)
    assert "bioplaus sweep" in text and "ray.address=" in text
    assert "ray stop" in text  # cleaned up on exit (trap)


def test_slurm_script_defaults_to_the_paper_preset_and_its_log_folder_exists(tmp_path):
    text = (CLUSTER_DIR / "slurm.sbatch").read_text()
    # the sweep gets preset=paper before the caller's arguments, so a preset=... given later wins
    assert re.search(r'^bioplaus sweep preset=paper .*"\$@"$', text, flags=re.MULTILINE)
    # SLURM writes no log when --output's folder is missing: the default is a bare name (the submit folder)
    (output,) = re.findall(r"^#SBATCH --output=(\S+)", text, flags=re.MULTILINE)
    assert "/" not in output
    # run with bash outside a job, the script makes runs/slurm/ and submits itself with its log there
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SBATCH_ARGS"\n')
    (fake / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", SBATCH_ARGS=str(tmp_path / "args"))
    work = tmp_path / "project"
    work.mkdir()
    run = subprocess.run(["bash", str(CLUSTER_DIR / "slurm.sbatch"), "preset=local", "name=try"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (work / "runs" / "slurm").is_dir()
    assert (tmp_path / "args").read_text().splitlines() == ["--output=runs/slurm/%x-%j.out",
                                                            str(CLUSTER_DIR / "slurm.sbatch"), "preset=local", "name=try"]


def test_cluster_readme_shows_the_exact_commands():
    text = (CLUSTER_DIR / "README.md").read_text()
    for command in ("ray up cluster/ray-cluster.yaml", "kubectl apply -f cluster/kuberay.yaml",
                    "sbatch cluster/slurm.sbatch", "make sweep CLUSTER=auto", "python -m bioplaus.cluster.local"):
        assert command in text, command
