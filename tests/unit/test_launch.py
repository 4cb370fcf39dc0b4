"""Where the ranks come from (engine/launcher_env.py): the variables srun, the deepspeed launcher and
torchrun set, read into one Launch with the source of each value."""
import pytest

from engine.dist import gpu_index
from engine.errors import UserError
from engine.launcher_env import JOB_PORT_BASE, first_host, from_environment, job_port, ranks_per_node, setup

SRUN_2X4 = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[017-018]",
            "SLURM_RESTART_COUNT": "2"}


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"), ("gpu[007-009,012],cpu1", "gpu007"), ("a1,a2", "a1"),
    ("rack[2-3]-n[01-04]", "rack2-n01"), ("node[5,1-3]", "node5"), ("10.213.7.[1-2]", "10.213.7.1"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_ranks_per_node_must_be_even():
    assert ranks_per_node("4(x3)") == ranks_per_node("4,4(x2)") == 4
    with pytest.raises(UserError, match="--ntasks-per-node"):
        ranks_per_node("3,1")


def test_srun_task():
    launch = from_environment(SRUN_2X4)
    assert (launch.launcher, launch.rank, launch.local_rank, launch.world_size, launch.ranks_per_node,
            launch.nodes) == ("srun", 5, 1, 8, 4, 2)
    assert (launch.master_addr, launch.master_port) == ("gpu017", JOB_PORT_BASE + 3456)
    assert (launch.job_id, launch.restarts) == ("123456", 2)
    assert launch.describe_ranks() == ("from srun (SLURM_STEP_NUM_TASKS, SLURM_STEP_TASKS_PER_NODE, "
                                       "SLURM_STEP_NUM_NODES)")
    assert "first host of SLURM_STEP_NODELIST" in launch.describe_rendezvous()
    assert "the same after a requeue" in launch.describe_rendezvous()


def test_the_user_may_choose_the_rendezvous():
    launch = from_environment({**SRUN_2X4, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29600"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.9", 29600)
    assert launch.describe_rendezvous() == "master_addr from MASTER_ADDR, master_port from MASTER_PORT"


def test_a_batch_script_outside_srun_is_one_process_of_its_job():
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"}
    launch = from_environment(env)
    assert (launch.launcher, launch.world_size, launch.job_id) == ("one process", 1, "77")


def test_an_array_task_is_its_own_job():
    launch = from_environment({**SRUN_2X4, "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "3"})
    assert launch.job_id == "900_3" and launch.master_port == job_port("900_3") == JOB_PORT_BASE + 9003


def test_a_launcher_inside_an_allocation_knows_its_ranks():
    env = {**SRUN_2X4, "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "gpu017", "MASTER_PORT": "29500"}
    launch = from_environment(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.nodes) == (
        "deepspeed launcher or torchrun", 9, 16, 2)
    assert launch.job_id == "123456"  # the run directory is still keyed by the job


def test_setup_exports_one_convention():
    env = dict(SRUN_2X4)
    setup(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                                "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "4",
        "MASTER_ADDR": "gpu017", "MASTER_PORT": str(JOB_PORT_BASE + 3456)}
    alone = {}
    setup(alone)
    assert alone["WORLD_SIZE"] == "1" and int(alone["MASTER_PORT"]) > 0


def test_several_ranks_without_a_port_are_refused():
    with pytest.raises(UserError, match="MASTER_PORT"):
        setup({"RANK": "0", "WORLD_SIZE": "2"})


def test_a_rendezvous_port_in_use_is_refused_with_the_flag_to_change(monkeypatch):
    import socket

    from engine.dist import check_rendezvous_port, free_port
    from engine.errors import UserError

    with socket.socket() as holder:  # another job listening on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        with pytest.raises(UserError, match=rf"port {port} \(MASTER_PORT.*is in use.*--master_port \d+"):
            check_rendezvous_port()
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's agent holds it itself
        check_rendezvous_port()
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    check_rendezvous_port()  # a free port passes


def test_local_rank_k_takes_gpu_k_and_a_rank_without_its_gpu_is_refused(monkeypatch):
    assert [gpu_index(k, 8) for k in range(8)] == list(range(8))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # srun --gpus-per-task 1: rank 3 sees its GPU as GPU 0
    with pytest.raises(UserError, match=r"local rank 3 sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3\).*"
                                        r"drop --gpus-per-task and --gpu-bind"):
        gpu_index(3, 1)
    with pytest.raises(UserError, match="at most one rank per GPU"):
        gpu_index(8, 8)
