"""MuJoCo ALOHA sim station (gym-aloha), ROS-free: ``env`` (physics, reward stages, cameras), ``corrector``
(when the scripted expert drives), ``expert`` (the scripted expert). Needs the ``aloha`` extra
(``pip install -e .[aloha]``); importing this package itself imports nothing."""


class RenderUnavailable(RuntimeError):
    """No OpenGL context could be created for the cameras (no EGL / GL libraries, or no display for the chosen
    MUJOCO_GL backend). The message is one line saying what to install."""
