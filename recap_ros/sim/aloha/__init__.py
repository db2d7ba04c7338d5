"""MuJoCo ALOHA sim station (gym-aloha), ROS-free: ``env`` (physics, reward stages, cameras), ``corrector``
(when the scripted expert drives), ``expert`` (the scripted expert). Needs the ``aloha`` extra
(``pip install -e .[aloha]``). Importing this package imports nothing; it makes headless EGL the default GL
backend (``MUJOCO_GL``, read when ``mujoco`` is first imported: import this package before ``mujoco``) unless
the caller chose one."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")


class RenderUnavailable(RuntimeError):
    """No OpenGL context could be created for the cameras (no EGL / GL libraries, or no display for the chosen
    MUJOCO_GL backend). The message is one line saying what to install."""


def gl_problem(error: BaseException) -> str:
    """One line saying why no GL context could be made, and what to install."""
    detail = str(error).splitlines()[0] if str(error) else "no detail"
    return (f"cannot render the ALOHA cameras with MUJOCO_GL={os.environ.get('MUJOCO_GL', '')} (read when mujoco "
            f"is first imported) ({type(error).__name__}: {detail}); headless EGL on Debian/Ubuntu needs "
            "`sudo apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0`")
