"""What torchrun and SLURM tell a training process, and SLURM submission through submitit (Lightning-free).

- `shared_value`: one value (the run timestamp) agreed by every rank of a torchrun job through the elastic agent's
  store, so all nodes name the same logdir.
- `trainer_defaults`: `num_nodes` / `devices` from the torchrun or SLURM environment, for flags the user left out.
- `parse_slurm` / `make_executor`: `--slurm partition=gpu,nodes=2,gpus_per_node=8,time=4:00:00` -> a submitit
  executor with the pre-emption signal `signal_delay_s` ahead of the time limit and `--requeue`.
- `MainJob`: the submitted callable. It runs `main.main(argv)` in the job's processes; on the pre-emption signal
  training saves last.ckpt at the end of the batch and stops, then submitit requeues the job, and the restarted
  job finds last.ckpt in the same logdir (same timestamp, same name) and continues from it.
"""
import dataclasses
import datetime
import json
import os
import re
import signal
import sys
import time
from typing import Any, Mapping, Sequence

import submitit
import yaml

from ldm.util import ConfigError

# The launching process chooses the run's timestamp once and exports it here; DDP workers that Lightning starts by
# re-running `main.py`, and submitit jobs, inherit it, so every rank (and a requeued job) names the same logdir.
TIMESTAMP_ENV = "LDM_RUN_TIMESTAMP"
EXIT_PREEMPTED = 3  # main.main's status when the pre-emption signal stopped training after saving last.ckpt

# submitit's executor parameters shared by all clusters; any other --slurm key is passed on as slurm_<key>
GENERIC_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "name")
SLURM_DEFAULTS = {"signal_delay_s": 120, "additional_parameters": {"requeue": True}}
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills a job after timeout_min (default 2)


# ---- environment ---------------------------------------------------------------------------------------------------
def shared_value(name: str, proposal: str, timeout_s: float = 120.0) -> str:
    """`proposal`, or under torchrun the first proposal any rank of the job made (held by the elastic agent's store).

    Keyed by the rendezvous id, so restarted workers of the same torchrun job get the first value again.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not env.get("MASTER_ADDR"):
        return proposal
    from torch.distributed import TCPStore
    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    key = f"ldm/{name}/{env.get('TORCHELASTIC_RUN_ID', 'none')}"
    return store.compare_set(key, "", proposal).decode()


def trainer_defaults(environ: Mapping[str, str], torchrun: bool, slurm: bool) -> dict[str, int]:
    """num_nodes and devices (processes per node) of a torchrun or SLURM launch; {} elsewhere."""
    if torchrun:
        per_node = int(environ["LOCAL_WORLD_SIZE"])
        return {"num_nodes": int(environ["WORLD_SIZE"]) // per_node, "devices": per_node}
    if slurm:
        nodes = int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
        per_node = environ.get("SLURM_NTASKS_PER_NODE")  # e.g. "8" or "8(x2)"
        tasks = int(per_node.split("(")[0]) if per_node else int(environ.get("SLURM_NTASKS", nodes)) // nodes
        return {"num_nodes": nodes, "devices": tasks}
    return {}


def global_rank() -> int:
    """This process' rank in a SLURM, torchrun or submitit-local job (0 outside one)."""
    for name in ("SLURM_PROCID", "RANK", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def preempt_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


# ---- --slurm -------------------------------------------------------------------------------------------------------
def parse_minutes(text: str) -> int:
    """SLURM time `MM`, `HH:MM:SS`, `D-HH:MM[:SS]` -> whole minutes (rounded up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"--slurm time={text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if b is None:  # MM, or D-HH
        seconds = (a * 3600 if days is not None else a * 60)
    elif c is None:  # MM:SS, or D-HH:MM
        seconds = a * 3600 + b * 60 if days is not None else a * 60 + b
    else:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    return -(-((days or 0) * 86400 + seconds) // 60)


def parse_slurm(text: str) -> dict[str, Any]:
    """`key=value,key=value` -> a dict (values read as YAML scalars; `time` -> `timeout_min`)."""
    spec: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm {text!r}: {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        spec[key] = parse_minutes(value) if key == "time" else yaml.safe_load(value)
    if "time" in spec:
        spec["timeout_min"] = spec.pop("time")
    return spec


def make_executor(spec: Mapping[str, Any], folder: str, name: str) -> submitit.AutoExecutor:
    """A submitit executor for `spec` (`cluster`: slurm, the default, or local: the same job on this machine).

    One task per GPU (`tasks_per_node` = `gpus_per_node`, what Lightning's SLURM environment expects), the
    pre-emption signal `signal_delay_s` (120) seconds before the time limit, and `requeue` on.
    """
    spec = dict(spec)
    cluster = spec.pop("cluster", "slurm")
    if cluster not in ("slurm", "local"):
        raise ConfigError(f"--slurm cluster={cluster!r}: expected slurm or local")
    spec.setdefault("tasks_per_node", spec.get("gpus_per_node") or 1)
    spec.setdefault("name", name)
    if cluster == "local":
        spec.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
    params = {key: value for key, value in spec.items() if key in GENERIC_KEYS}
    params.update({f"slurm_{key}": value for key, value in {**SLURM_DEFAULTS, **spec}.items()
                   if key not in GENERIC_KEYS})
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        executor.update_parameters(**params)
    except (NameError, ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError(f"--slurm: {err}") from err
    return executor


@dataclasses.dataclass
class MainJob(submitit.helpers.Checkpointable):
    """`main.main(argv)` inside a submitit job, with the run's timestamp fixed at submission.

    `status_file` (sweeps) records running / finished / failed / preempted with times and the job id.
    """
    argv: Sequence[str]
    timestamp: str
    main_dir: str                       # folder of main.py (imported in the job)
    status_file: str | None = None
    cwd: str | None = None              # the submitting process' folder (relative paths in argv)

    def __call__(self) -> str:
        os.environ[TIMESTAMP_ENV] = self.timestamp
        if self.cwd:
            os.chdir(self.cwd)
        signum = preempt_signal()
        requeue = signal.getsignal(signum)  # submitit's handler: checkpoint() + `scontrol requeue` on rank 0
        if self.main_dir not in sys.path:
            sys.path.insert(0, self.main_dir)
        import main
        self._record("running")
        try:
            code = main.main(list(self.argv), preempt_signal=signum)
        except BaseException as err:
            self._record("failed", error=repr(err))
            raise
        if code == EXIT_PREEMPTED:
            self._record("preempted")
            if callable(requeue):
                requeue(signum, None)  # on rank 0 this requeues and exits
            return "preempted"
        if code != 0:
            self._record("failed", returncode=code)
            raise RuntimeError(f"main.py {' '.join(self.argv)} exited with status {code}")
        self._record("finished")
        return "finished"

    def _record(self, status: str, **extra: Any) -> None:
        if self.status_file and global_rank() == 0:
            write_status(self.status_file, status, **extra)


def submit(spec: str, argv: Sequence[str], logdir: str, timestamp: str, main_dir: str) -> int:
    """`--slurm`: submit `main.py argv` as one job that trains in `logdir`, and return."""
    folder = os.path.join(logdir, "submitit")
    executor = make_executor(parse_slurm(spec), folder, os.path.basename(logdir))
    job = executor.submit(MainJob(list(argv), timestamp, main_dir, cwd=os.getcwd()))
    print(f"Submitted job {job.job_id}: it trains in {logdir}; submitit files and logs in {folder}")
    return 0


def write_status(path: str, status: str, **extra: Any) -> None:
    """Update the JSON status file `path` (atomically): status, its time, the job id, attempts."""
    record = read_status(path)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record.update(extra, status=status, updated=now)
    if status == "running":
        record.update(attempts=record.get("attempts", 0) + 1, started=now,
                      job_id=os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"))
        record.pop("error", None)
        record.pop("returncode", None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def read_status(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
