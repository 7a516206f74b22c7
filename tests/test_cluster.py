"""Cluster glue: torchrun / SLURM environments, one run timestamp for all ranks, --slurm submission through submitit
with pre-emption requeue, FSDP sharding. Multi-process runs (2 "nodes" under torchrun, FSDP on 2 CPU processes, a
SLURM pre-emption round trip) are marked slow."""
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import submitit
import torch
from omegaconf import OmegaConf

import main
from ldm import cli, cluster, loading
from ldm.callbacks import AtomicCheckpointIO, LastCheckpoint
from ldm.util import ConfigError, instantiate_from_config
from tests.test_main import load, runs, toy_yaml  # noqa: F401 - fixture
from tests.toy_model import ToyAutoencoder, ToyImages

REPO = Path(__file__).resolve().parents[1]
TINY_LDM = str(REPO / "tests" / "configs" / "tiny_ldm.yaml")
QUIET = ["lightning.trainer.enable_progress_bar=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != cli.TIMESTAMP_ENV and not k.startswith(("SLURM_", "SUBMITIT"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def stub_slurm(folder: Path) -> Path:
    """sbatch (keeps the script, answers job 4242), srun (present, never run) and scontrol (logs its arguments)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": f'cp "$1" "{folder}/sbatch.sh"\necho "Submitted batch job 4242"\n',
               "srun": "exit 1\n", "scontrol": f'echo "$@" >> "{folder}/scontrol.log"\n'}
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


# ---------------------------------------------------------------- environments and the run timestamp

def test_launch_defaults_from_torchrun_and_slurm_fill_what_config_and_flags_leave_open():
    assert cluster.trainer_defaults({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, True, False) == {
        "num_nodes": 2, "devices": 2}
    assert cluster.trainer_defaults({"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_NTASKS": "16"},
                                    False, True) == {"num_nodes": 2, "devices": 8}
    assert cluster.trainer_defaults({"SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "6"}, False, True) == {
        "num_nodes": 3, "devices": 2}
    assert cluster.trainer_defaults({"SLURM_NTASKS": "6"}, False, False) == {}
    config = cli.trainer_config({"trainer": {"devices": 1}}, cli.parse_args(["--num_nodes", "5"]),
                                {"num_nodes": 2, "devices": 2})
    assert config == {"num_nodes": 5, "devices": 1}


def test_torchrun_ranks_agree_on_the_first_timestamp_through_the_agent_store(monkeypatch):
    port = free_port()
    agent = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=10))  # what torchrun's agent hosts
    assert cluster.shared_value("run_timestamp", "A") == "A"  # not under torchrun: one's own value
    monkeypatch.delenv(cli.TIMESTAMP_ENV, raising=False)
    for key, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "job7"}.items():
        monkeypatch.setenv(key, value)
    assert cluster.shared_value("run_timestamp", "2020-01-01T00-00-00") == "2020-01-01T00-00-00"  # first rank
    with cli.shared_timestamp() as now:  # a later rank (or a restarted worker) proposes its own time
        assert now == "2020-01-01T00-00-00"
    assert agent.get("ldm/run_timestamp/job7") == b"2020-01-01T00-00-00"


def test_a_new_run_whose_logdir_has_last_ckpt_continues_from_it(tmp_path):
    opt = cli.parse_args(["-b", "cfg/x.yaml", "-l", str(tmp_path)])
    first = cli.run_paths(opt, "2024-01-02T03-04-05")
    assert first.resume_ckpt is None
    os.makedirs(first.ckptdir)
    Path(first.ckptdir, "last.ckpt").write_bytes(b"")
    again = cli.run_paths(opt, "2024-01-02T03-04-05")  # the same timestamp: a requeued job
    assert again.logdir == first.logdir and again.resume_ckpt == os.path.join(first.ckptdir, "last.ckpt")
    assert again.base == ["cfg/x.yaml"]
    assert cli.run_paths(opt, "2024-01-02T03-04-06").resume_ckpt is None


def test_child_argv_leaves_out_the_launch_flags():
    argv = ["-b", "a.yaml", "--slurm", "nodes=2", "-t", "--sweep=s.yaml", "--jobs", "2", "x.y=1"]
    assert cli.child_argv(argv, "-n", "r") == ["-b", "a.yaml", "-t", "x.y=1", "-n", "r"]
    with pytest.raises(ConfigError, match="in full"):
        cli.child_argv(["-b", "a.yaml", "--slu=nodes=2"])
    for bad in (["--jobs", "2"], ["--sweep", "s.yaml", "-r", "logs/x"], ["--sweep", "s.yaml", "--jobs", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


# ---------------------------------------------------------------- --slurm

def test_slurm_spec_and_time_formats():
    assert cluster.parse_slurm("partition=gpu, nodes=2,gpus_per_node=8,time=4:00:00,account=proj") == {
        "partition": "gpu", "nodes": 2, "gpus_per_node": 8, "timeout_min": 240, "account": "proj"}
    for text, minutes in [("90", 90), ("90:30", 91), ("1:00:00", 60), ("2-00", 2880), ("1-12:30", 2190),
                          ("1-00:00:30", 1441)]:
        assert cluster.parse_minutes(text) == minutes, text
    with pytest.raises(ConfigError, match="time='soon'"):
        cluster.parse_slurm("time=soon")
    with pytest.raises(ConfigError, match="'nodes' is not key=value"):
        cluster.parse_slurm("nodes")


def test_slurm_submission_writes_signal_and_requeue_and_trains_nothing_here(tmp_path, monkeypatch, toy_yaml,
                                                                              capsys):
    monkeypatch.setenv("PATH", f"{stub_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(cli.TIMESTAMP_ENV, raising=False)
    logs = tmp_path / "logs"
    spec = "partition=debug,nodes=2,gpus_per_node=4,time=1:30:00,signal_delay_s=90,qos=high"
    assert main.main(["-b", toy_yaml, "-t", "-l", str(logs), "--slurm", spec, "model.params.embed_dim=3"]) == 0
    [logdir] = runs(logs)
    assert f"Submitted job 4242: it trains in {logdir}" in capsys.readouterr().out
    script = (tmp_path / "sbatch.sh").read_text()
    for line in ("--signal=USR2@90", "--requeue", "--partition=debug", "--nodes=2", "--ntasks-per-node=4",
                 "--gpus-per-node=4", "--time=90", "--qos=high", f"--job-name={logdir.name}"):
        assert f"#SBATCH {line}\n" in script, line
    assert "\nsrun " in script and "submitit.core._submit" in script
    job = submitit.core.utils.DelayedSubmission.load(logdir / "submitit" / "4242_submitted.pkl").function
    assert isinstance(job, cluster.MainJob) and job.timestamp == logdir.name.split("_")[0]
    assert job.argv == ["-b", toy_yaml, "-t", "-l", str(logs), "model.params.embed_dim=3"]
    assert not (logdir / "checkpoints").exists()  # nothing trained on the submitting machine
    assert main.main(["-b", toy_yaml, "-t", "-l", str(logs), "--slurm", "nodes=1,bogus_key=1"]) == 2
    assert "--slurm" in (err := capsys.readouterr().err) and "bogus_key" in err


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_signal_with_stop_saves_then_stops_every_rank_and_leaves_the_old_handler_to_the_caller(tmp_path):
    calls = []
    before = signal.signal(signal.SIGUSR1, lambda *args: calls.append(args))
    try:
        callback = LastCheckpoint(str(tmp_path / "last.ckpt"), periodic=False, stop_on_signal=True)
        trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                             plugins=[AtomicCheckpointIO()])
        trainer.fit(ToyAutoencoder(signal_at=1), torch.utils.data.DataLoader(ToyImages(length=32), batch_size=4))
        assert callback.stopped_by_signal and trainer.global_step == 2
        assert load(tmp_path / "last.ckpt")["global_step"] == 2
        assert calls == []  # submitit's requeue runs after training, by MainJob
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_preempted_main_returns_its_status_and_the_restart_continues_in_the_same_logdir(tmp_path, toy_yaml,
                                                                                      monkeypatch):
    monkeypatch.setenv(cli.TIMESTAMP_ENV, "2024-05-06T07-08-09")  # what MainJob fixes for every attempt
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    argv = ["-b", toy_yaml, "-t", "-l", str(tmp_path), "--max_steps", "6", "model.params.signal_at=1", *QUIET]
    try:
        assert main.main(argv, preempt_signal=signal.SIGUSR1) == cluster.EXIT_PREEMPTED
        [logdir] = runs(tmp_path)
        assert load(logdir / "checkpoints" / "last.ckpt")["global_step"] == 2
        assert main.main(argv, preempt_signal=signal.SIGUSR1) == 0
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert runs(tmp_path) == [logdir]
    last = load(logdir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and last["optimizer_states"][0]["state"][0]["step"] == 6


# ---------------------------------------------------------------- FSDP (sharding in one process)

def tiny_ldm(**params):
    config = OmegaConf.load(TINY_LDM).model
    config.params.update(params)
    torch.manual_seed(0)
    return instantiate_from_config(config)


def test_fsdp_wraps_unet_blocks_and_shards_the_ema_but_not_the_frozen_first_stage():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from ldm.models import sharding
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny_ldm()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.shard(mesh)
        unet = model.model.diffusion_model
        blocks = [m for m in unet.modules() if isinstance(m, sharding.WRAPPED_BLOCKS)]
        assert blocks and all(isinstance(m, FSDPModule) for m in blocks + [unet])
        assert sum(isinstance(m, FSDPModule) for m in model.modules()) == len(blocks) + 1  # nothing else
        kinds = {c.__name__ for c in sharding.WRAPPED_BLOCKS if any(isinstance(m, c) for m in blocks)}
        assert kinds == {"ResBlock", "AttentionBlock"}  # the tiny U-Net has no SpatialTransformer
        assert not any(isinstance(m, FSDPModule) for m in model.first_stage_model.modules())
        ema = dict(model.model_ema.named_buffers())
        assert all(isinstance(v, DTensor) for k, v in ema.items() if k not in ("decay", "num_updates"))
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(1.0)
        model.model_ema(model.model)  # the update runs on the shards
        with model.ema_scope():
            assert torch.equal(unet.out[2].bias.full_tensor(), model.model_ema.diffusion_modelout2bias.full_tensor())
        after = model.state_dict()
        assert set(after) == set(before)  # the checkpoint layout is unchanged
        assert torch.allclose(after["model.diffusion_model.out.2.bias"].full_tensor(),
                              before["model.diffusion_model.out.2.bias"] + 1)
        with pytest.raises(ConfigError, match="logvar"):
            tiny_ldm(learn_logvar=True).shard(mesh)
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(ConfigError, match="--strategy ddp"):
        sharding.fully_sharded_strategy(ToyAutoencoder())


# ---------------------------------------------------------------- multi-process runs (slow)

@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """tiny_ldm on 2 "nodes" of 1 process each: two torchrun agents meeting at a c10d rendezvous on localhost."""
    tmp = tmp_path_factory.mktemp("torchrun")
    port = free_port()
    argv = ["main.py", "-b", TINY_LDM, "-t", "-l", str(tmp / "logs"),
            f"lightning.callbacks.rank_state={{target: tests.toy_model.RankState, params: {{folder: {tmp}}}}}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "ldm-test"]
    nodes = [subprocess.Popen(torchrun + argv, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    return tmp, nodes, outputs


@pytest.mark.slow
def test_two_torchrun_nodes_share_one_logdir_and_end_with_identical_weights(torchrun_run):
    tmp, nodes, outputs = torchrun_run
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    [logdir] = runs(tmp / "logs")
    out = "".join(outputs)
    assert out.count("Run directory:") == 1 and "1 (devices) * 2 (num_nodes) * 2 (batch_size)" in out
    rank0, rank1 = (torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0) == set(rank1)
    assert any(k.startswith("model_ema.") for k in rank0) and float(rank0["scale_factor"]) != 1.0
    for key in rank0:  # U-Net, EMA, scale_by_std's scale_factor
        assert torch.equal(rank0[key], rank1[key]), key
    last = load(logdir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1 * 1 * 2 * 2 * 1e-4)
    assert all(torch.equal(last["state_dict"][k], rank0[k]) for k in rank0)
    assert sorted(os.listdir(logdir / "images" / "val")) and len(list((logdir / "configs").glob("*.yaml"))) == 2


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_ddp_and_its_checkpoint_loads_in_one_process(torchrun_run, tmp_path):
    ddp_dir = next((torchrun_run[0] / "logs").iterdir())
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "main.py", "-b", TINY_LDM, "-t", "-l", str(logs), "--devices", "2",
                           "--strategy", "fsdp", "model.params.unet_config.params.use_checkpoint=true"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [logdir] = runs(logs)
    fsdp = load(logdir / "checkpoints" / "last.ckpt")
    ddp = load(ddp_dir / "checkpoints" / "last.ckpt")
    assert fsdp["global_step"] == 4 and set(fsdp["state_dict"]) == set(ddp["state_dict"])
    for key, value in ddp["state_dict"].items():  # same data, noise and steps: sharded = replicated
        assert torch.allclose(fsdp["state_dict"][key].float(), value.float(), atol=1e-4), key
    assert sorted(os.listdir(logdir / "images" / "train")) == sorted(os.listdir(ddp_dir / "images" / "train"))
    model = loading.load_model(sorted((logdir / "configs").glob("*-project.yaml"))[0],
                               logdir / "checkpoints" / "last.ckpt")  # one process, strict, EMA weights
    ema = fsdp["state_dict"]["model_ema.diffusion_modelinput_blocks10in_layers2weight"]
    assert torch.equal(model.model.diffusion_model.input_blocks[1][0].in_layers[2].weight, ema)


@pytest.mark.slow
def test_slurm_preemption_signal_saves_requeues_and_the_restarted_job_continues(tmp_path, monkeypatch):
    bin_dir = stub_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(cli.TIMESTAMP_ENV, raising=False)
    logs, marker, steps = tmp_path / "logs", tmp_path / "slow", tmp_path / "step"
    marker.write_text("")
    slow = f"{{target: tests.toy_model.SlowSteps, params: {{step_file: {steps}, marker: {marker}}}}}"
    argv = ["-b", TINY_LDM, "-t", "-l", str(logs), "--max_steps", "12", "model.params.lr_warmup_steps=5",
            "lightning.trainer.val_check_interval=8", f"lightning.callbacks.slow={slow}"]
    assert main.main([*argv, "--slurm", "partition=debug,nodes=1,time=10"]) == 0
    [logdir] = runs(logs)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": logdir.name,
             "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    job = [sys.executable, "-u", "-m", "submitit.core._submit", str(logdir / "submitit")]  # the sbatch script's line
    first = subprocess.Popen(job, cwd=REPO, env=clean_env(**slurm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 300
    while not (steps.exists() and steps.read_text().strip() and int(steps.read_text()) >= 3):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR2)  # SLURM: signal_delay_s before the time limit
    out = first.communicate(timeout=300)[0]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", out[-3000:]
    saved = load(logdir / "checkpoints" / "last.ckpt")["global_step"]
    assert 3 <= saved < 12 and first.returncode != 0
    marker.unlink()
    second = subprocess.run(job, cwd=REPO, env=clean_env(SLURM_RESTART_COUNT="1", **slurm), capture_output=True,
                            text=True, timeout=300)  # the requeued job: same script, same pickle
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"continuing from {logdir / 'checkpoints' / 'last.ckpt'}" in second.stdout + second.stderr
    assert runs(logs) == [logdir]
    last = load(logdir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 12 and last["epoch"] == 1  # 8 batches per epoch
    assert last["optimizer_states"][0]["state"][0]["step"] == 12
    assert last["lr_schedulers"][0]["last_epoch"] == 12
    assert int(last["state_dict"]["model_ema.num_updates"]) == 12
    status, result = submitit.core.utils.pickle_load(logdir / "submitit" / "4242_0_result.pkl")
    assert (status, result) == ("success", "finished")
