"""ROS-free simulator of the sim station: kinematics, dynamics, task, renderer, scripted expert, corrector.

    from recap_ros.sim import SimEnv, Expert
    env = SimEnv(load_station("sim")); task = env.reset(seed=3)
    expert = Expert(env.kin, env.dt); expert.reset(task)
    while not env.status.done:
        env.step(expert.act(env.state))
"""
from recap_ros.sim.corrector import Corrector
from recap_ros.sim.env import SimEnv, check_command
from recap_ros.sim.expert import Expert, run_expert_episode
from recap_ros.sim.kinematics import Bimanual
from recap_ros.sim.task import Status, Task, sample_task

__all__ = ["Bimanual", "Corrector", "Expert", "SimEnv", "Status", "Task", "check_command", "run_expert_episode",
           "sample_task"]
