"""value_monitor: the value function's live estimate of progress, and alerts when it drops.

Wiring only; V of one observation is :class:`recap_ros.monitor.live_value.LiveValue`, the drop alert
:class:`recap_ros.monitor.value_alert.ValueAlert`. Its own process (a node like the others), so its inference
never runs in the policy server's process or its 50 Hz tick process.

Topics (from the station): subscribes every camera's ``image_raw`` (SENSOR_QOS, kept serialized; only the
newest frame of each is decoded, at the monitor's rate), ``robot.joint_states_topic``, ``policy.prompt_topic``
(latched) and the station's ``episode_topic`` (start: its prompt, a fresh alert window; end: no alerts until
the next start). Every ``1 / rate_hz`` seconds, once every camera and the joint state have arrived, it publishes

* ``value_monitor.value_topic`` (``/value``), a ``sensor_msgs/JointState``: stamped (header stamp = the
  observation time, the oldest of the frames and joint state used), named fields (``name`` = ["value",
  "steps_to_go"], ``position`` = [V in [-1, 0], -V * max_len control ticks]) and plotted by Foxglove as
  ``/value.position[0]`` (V) and ``/value.position[1]`` (steps to go). A standard interface the recorder,
  export and every ROS tool read without a custom message package; Float64 has no stamp, DiagnosticArray
  carries numbers as strings (not plottable), Float64MultiArray has no stamp;
* ``value_monitor.alert_topic`` (``/value/alert``, std_msgs/String) when V falls by more than ``drop`` within
  ``window_s`` (text with the numbers), plus a WARN on ``/diagnostics`` for ``window_s`` after it.

``/diagnostics`` (1 Hz): OK with V, steps to go, evaluations per second and inference time; WARN after an alert
or while a camera / the joint state is missing or stale; ERROR when the bundle could not be loaded. A bad bundle
or a missing camera never stops the node nor the station: it logs one line saying what is wrong and keeps
reporting it on /diagnostics; an observation the model fails on (a bad frame) is logged (throttled) and skipped.

Parameters: ``station``; ``bundle``, ``rate_hz``, ``drop``, ``window_s``, ``max_len``, ``threads``, ``device``
(defaults from the station's ``value_monitor:`` section); ``stale_after_s`` (1.0: older observations are not
evaluated).
"""
from __future__ import annotations

import json
import sys
import time

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from recap_ros import rosmsg
from recap_ros.monitor.value_alert import Alert, ValueAlert
from recap_ros.nodes import run_node
from recap_ros.station import StationConfigError, load_station

OK, WARN, ERROR = 0, 1, 2
FIELDS = ("value", "steps_to_go")


class ValueMonitorNode(Node):
    def __init__(self, value=None, **node_kwargs):
        """``value``: a callable (views, state, prompt) -> V; None loads the station's value bundle."""
        super().__init__("value_monitor", **node_kwargs)
        station = load_station(self.declare_parameter("station", "sim").value)
        mon = station.value_monitor
        if mon is None:
            raise StationConfigError(station.file, "value_monitor", None,
                                     "the station has no enabled value_monitor section")
        p = self._param
        bundle = p("bundle", mon.bundle, "value bundle name (models/<name>) or directory")
        rate_hz = p("rate_hz", mon.rate_hz, "V evaluations per second")
        self.max_len = p("max_len", mon.max_len, "the task's maximum episode length in control ticks")
        self.alert = ValueAlert(p("drop", mon.drop, "alert when V falls by more than this ..."),
                                p("window_s", mon.window_s, "... within this many seconds"))
        threads = p("threads", mon.threads, "torch CPU threads (0: torch's default)")
        device = p("device", mon.device, "torch device of the value model: cpu, cuda, cuda:N")
        self.stale_after_ns = int(p("stale_after_s", 1.0, "observations older than this are not evaluated") * 1e9)
        self.station, self.cameras, self.names = station, station.cameras, station.robot.joint_names
        self.prompt = station.policy.prompt
        self.value_topic, self.alert_topic = mon.value_topic, mon.alert_topic

        self.problem = ""  # why no value is published (ERROR when the bundle failed)
        self.value = value
        if value is None:
            from recap_ros.monitor.live_value import LiveValue
            from recap_ros.recap.value import ValueBundleError

            try:
                self.value = LiveValue(bundle, len(self.cameras), len(self.names), threads or None, device)
            except (ValueBundleError, OSError, RuntimeError) as e:  # RuntimeError: e.g. no such CUDA device
                self.problem = f"value bundle '{bundle}' not loaded: {e}"
                self.get_logger().error(f"{self.problem}; publishing no values (the station runs on)")

        self._images: list[bytes | None] = [None] * len(self.cameras)  # newest serialized frame per camera
        self._image_ns = [0] * len(self.cameras)
        self._state = None
        self._state_ns = 0
        self._in_episode = True  # until an end event: a station without episode events is always in one
        self._last: tuple[float, float] | None = None  # (V, steps to go)
        self._alert_until_ns = 0
        self._last_alert: Alert | None = None
        self.alerts = 0
        self.evaluations = 0
        self.failures = 0  # evaluations that raised (bad frame, model error)
        self._last_stamp_ns = 0
        self._infer_ms = 0.0
        self._told: set[str] = set()  # waiting reasons already logged (once each)

        self.pub_value = self.create_publisher(JointState, mon.value_topic, rosmsg.EVENT_QOS)
        self.pub_alert = self.create_publisher(String, mon.alert_topic, rosmsg.EVENT_QOS)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        for i, cam in enumerate(self.cameras):
            self.create_subscription(Image, cam.image_topic, lambda m, i=i: self._on_image(i, m),
                                     rosmsg.SENSOR_QOS, raw=True)
        self.create_subscription(JointState, station.robot.joint_states_topic, self._on_joint_state,
                                 rosmsg.COMMAND_QOS)
        self.create_subscription(String, station.policy.prompt_topic, self._on_prompt, rosmsg.LATCHED_QOS)
        self.create_subscription(String, station.episode_topic, self._on_episode, rosmsg.EVENT_HISTORY_QOS)
        self.create_timer(1.0 / rate_hz, self._evaluate)
        self.create_timer(1.0, self._publish_diagnostics)
        self._rate_t0, self._rate_n, self.rate_hz = time.monotonic(), 0, 0.0
        if not self.problem:
            self.get_logger().info(
                f"station '{station.name}', value bundle {bundle}: V at {rate_hz:g} Hz on {mon.value_topic}, "
                f"alert on {mon.alert_topic} when V drops more than {self.alert.drop:g} within "
                f"{self.alert.window_s:g} s (steps to go = -V x {self.max_len})")

    def _param(self, name: str, default, description: str):
        return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    # ------------------------------------------------------------------------------------ ROS callbacks
    def _on_image(self, i: int, raw: bytes) -> None:
        try:
            self._image_ns[i] = rosmsg.header_stamp_ns(raw)
        except rosmsg.MessageError as e:
            self.get_logger().error(f"{self.cameras[i].image_topic}: {e}", throttle_duration_sec=5.0)
            return
        self._images[i] = raw

    def _on_joint_state(self, msg: JointState) -> None:
        try:
            self._state = rosmsg.positions_from_joint_state(msg, self.names)
        except rosmsg.MessageError as e:
            self.get_logger().warning(f"ignoring {self.station.robot.joint_states_topic}: {e}",
                                      throttle_duration_sec=5.0)
            return
        self._state_ns = rosmsg.stamp_to_ns(msg.header.stamp)

    def _on_prompt(self, msg: String) -> None:
        if msg.data.strip():
            self.prompt = msg.data.strip()

    def _on_episode(self, msg: String) -> None:
        try:
            event = json.loads(msg.data)
        except json.JSONDecodeError:
            self.get_logger().warning(f"ignoring an episode event that is not JSON: {msg.data[:80]!r}")
            return
        kind = event.get("event") if isinstance(event, dict) else None
        if kind not in ("start", "end"):
            return
        self.alert.reset()  # the robot was reset: V jumps, which is no drop
        self._in_episode = kind == "start"
        if kind == "start" and str(event.get("prompt", "")).strip():
            self.prompt = str(event["prompt"]).strip()

    # ------------------------------------------------------------------------------------ evaluation
    def _waiting_for(self, now_ns: int) -> str:
        """Why the newest observation cannot be evaluated ("" when it can)."""
        missing = [c.name for c, raw in zip(self.cameras, self._images) if raw is None]
        if self._state is None:
            missing.append(self.station.robot.joint_states_topic)
        if missing:
            return f"no data yet from {', '.join(missing)}"
        stale = [c.name for c, t in zip(self.cameras, self._image_ns) if now_ns - t > self.stale_after_ns]
        if now_ns - self._state_ns > self.stale_after_ns:
            stale.append(self.station.robot.joint_states_topic)
        return f"stale data from {', '.join(stale)}" if stale else ""

    def _evaluate(self) -> None:
        if self.problem:
            return
        now = rosmsg.now_ns(self)
        waiting = self._waiting_for(now)
        if waiting:
            key = waiting.split(" from ")[0]
            if key not in self._told:
                self._told.add(key)
                self.get_logger().info(f"not evaluating V yet: {waiting}")
            return
        stamp = min(min(self._image_ns), self._state_ns)
        t0 = time.perf_counter()
        try:
            views = [rosmsg.image_from_msg(deserialize_message(raw, Image)) for raw in self._images]
            v = float(self.value(views, self._state, self.prompt))
        except Exception as e:  # a bad frame or a model error costs this evaluation, never the node (or station)
            self.failures += 1
            self.get_logger().error(f"V not evaluated: {type(e).__name__}: {e}", throttle_duration_sec=5.0)
            return
        self._infer_ms = (time.perf_counter() - t0) * 1e3
        steps = -v * self.max_len
        self._last = (v, steps)
        self.evaluations += 1
        self._rate_n += 1
        self.pub_value.publish(rosmsg.joint_state_msg(FIELDS, [v, steps], stamp))
        if not self._in_episode:
            return
        if stamp < self._last_stamp_ns:  # observation time went back (a restarted driver or sim): a new window
            self.alert.reset()
        self._last_stamp_ns = stamp
        alert = self.alert.update(stamp / 1e9, v)
        if alert is not None:
            self.alerts += 1
            self._last_alert = alert
            self._alert_until_ns = now + int(self.alert.window_s * 1e9)
            self.pub_alert.publish(String(data=alert.text()))
            self.get_logger().warning(alert.text())
            self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        now = rosmsg.now_ns(self)
        t = time.monotonic()
        if t - self._rate_t0 >= 1.0:
            self.rate_hz, self._rate_t0, self._rate_n = self._rate_n / (t - self._rate_t0), t, 0
        values = {"alerts": self.alerts, "evaluations": self.evaluations, "failures": self.failures,
                  "rate_hz": f"{self.rate_hz:.2f}",
                  "inference_ms": f"{self._infer_ms:.1f}", "prompt": self.prompt}
        if self._last is not None:
            values.update(value=f"{self._last[0]:.4f}", steps_to_go=f"{self._last[1]:.1f}")
        if self.problem:
            level, message = ERROR, self.problem
        elif now < self._alert_until_ns and self._last_alert is not None:
            level, message = WARN, self._last_alert.text()
        else:
            waiting = self._waiting_for(now)
            level, message = (WARN, waiting) if waiting else (OK, "evaluating")
        self.pub_diag.publish(rosmsg.diagnostic_array(now, [("value_monitor", level, message, values)]))


def main(args=None) -> int:
    return run_node("value_monitor", ValueMonitorNode, args)


if __name__ == "__main__":
    sys.exit(main())
