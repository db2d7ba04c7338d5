"""episode_recorder: one rosbag2 bag (MCAP, zstd chunks, metadata.yaml v9) per episode, with RECAP labels.

Wiring only; queue, writer thread, bag lifecycle, episode facts and crash safety live in
:mod:`recap_ros.recording.writer` (and ``recap-bag-repair`` in :mod:`recap_ros.recording.repair`).

- Records every topic of ``station.recorded_topics()`` as the serialized CDR received (raw subscriptions),
  bag timestamp = the middleware's receive time (header stamps stay inside the messages).
- QoS matched to the publishers: every ``discovery_period_s`` the node looks up each topic's publishers and
  (re)subscribes reliable only if all publishers are reliable and transient-local only if all are; a topic
  without publishers is not subscribed yet. Their offered QoS is stored with the topic in the bag.
- Services: ``~/start`` (std_srvs/Trigger: new bag ``<output_dir>/<station>_<YYYYmmdd-HHMMSS>_ep<NNNN>``),
  ``~/stop`` (Trigger), ``~/label`` (std_srvs/SetBool: outcome success/failure of the current episode or,
  after stop, of the last one). Failures answer success=false with the reason.
- ``auto_episodes`` (default from the station; true on sim): the sim's episode events start, label and stop.
- ``/diagnostics`` once per ``diagnostics_period_s``: state, queue fill, drops per topic (WARN when any).

Parameters: ``station``; ``output_dir``, ``queue_size``, ``auto_episodes``, ``min_free_disk_mb`` (defaults from
the station's recorder section); ``model`` (bundle id recorded as recap.model; default: the id of the station's
policy bundle), ``operator``, ``flush_period_s`` (0.25), ``discovery_period_s`` (0.5),
``diagnostics_period_s`` (1.0).
"""
from __future__ import annotations

import functools
import importlib
import sys
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from std_srvs.srv import SetBool, Trigger

from recap_ros.nodes import run_node
from recap_ros.recording import (BagError, EpisodeRecorder, RecorderConfig, RecorderError,
                                 matched_subscription_qos)
from recap_ros.rosmsg import diagnostic_array, now_ns
from recap_ros.station import load_station

SUBSCRIPTION_DEPTH = 100
_INFINITE_NS = 2**63 - 1


def _qos_time(duration) -> QosTime:
    ns = int(duration.nanoseconds)
    if ns >= _INFINITE_NS:  # as rosbag2 writes an infinite duration
        return QosTime(2147483647, 4294967295)
    return QosTime(ns // 1_000_000_000, ns % 1_000_000_000)


def to_bag_qos(p: QoSProfile) -> Qos:
    """An rclpy QoS profile (as offered by a publisher) in rosbags' form (same rmw enum values)."""
    return Qos(QosHistory(int(p.history)), int(p.depth), QosReliability(int(p.reliability)),
               QosDurability(int(p.durability)), _qos_time(p.deadline), _qos_time(p.lifespan),
               QosLiveliness(int(p.liveliness)), _qos_time(p.liveliness_lease_duration),
               bool(p.avoid_ros_namespace_conventions))


class EpisodeRecorderNode(Node):
    def __init__(self, **node_kwargs):
        super().__init__("episode_recorder", **node_kwargs)
        self.station = st = load_station(self.declare_parameter("station", "sim").value)
        rec = st.recorder
        p = self.declare_parameter
        config = RecorderConfig.from_station(
            st, output_dir=str(p("output_dir", rec.output_dir).value),
            queue_size=int(p("queue_size", rec.queue_size).value),
            auto_episodes=bool(p("auto_episodes", rec.auto_episodes).value),
            min_free_disk_mb=int(p("min_free_disk_mb", rec.min_free_disk_mb).value),
            model=str(p("model", "").value) or self._bundle_id(),
            operator=str(p("operator", "").value),
            flush_period_s=float(p("flush_period_s", 0.25).value))
        discovery_period = float(p("discovery_period_s", 0.5).value)
        diag_period = float(p("diagnostics_period_s", 1.0).value)
        self.recorder = EpisodeRecorder(config, log=self._log)
        self._classes = {}
        for topic, msgtype in st.recorded_topics():
            try:
                self._classes[topic] = _msg_class(msgtype)
                self.recorder.add_topic(topic, msgtype)
            except BagError as e:
                self.get_logger().error(f"station {st.file}: not recording {topic}: {e}")
        self._subs: dict[str, tuple[object, tuple[bool, bool]]] = {}
        self._bytes_mark = (time.monotonic(), 0)

        # services share the single-threaded executor (see run_node) with the topics: one waiting for the writer
        # thread (it drains the queue at thousands of messages/s) only leaves messages in the subscriptions' history
        self.create_service(Trigger, "~/start", self._on_start)
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_service(SetBool, "~/label", self._on_label)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(discovery_period, self._discover)
        self.create_timer(diag_period, self._publish_diagnostics)
        self._discover()
        self.get_logger().info(
            f"station '{st.name}': recording {len(self.recorder.topics)} topics into {config.output_dir} "
            f"(queue {config.queue_size}, {config.compression}, auto_episodes={config.auto_episodes}, "
            f"model '{config.model}')")

    def _bundle_id(self) -> str:
        """recap.model default: the id of the station's policy bundle (its name if it cannot be opened)."""
        bundle = self.station.policy.bundle
        try:
            from recap_ros.policy.bundle import open_bundle

            return open_bundle(bundle, verify=False).bundle_id
        except Exception as e:  # a missing or broken bundle must not stop the recording
            self.get_logger().warning(f"policy bundle '{bundle}' not readable ({e}); recording recap.model as "
                                      f"its name (set parameter 'model' to override)")
            return bundle

    def _log(self, level: str, text: str) -> None:
        # one call site per severity: rclpy's logger refuses a call site whose severity changes between calls
        logger = self.get_logger()
        if level == "error":
            logger.error(text)
        elif level == "warn":
            logger.warning(text)
        else:
            logger.info(text)

    # ------------------------------------------------------------------------------------------ topics
    def _discover(self) -> None:
        """(Re)subscribe each topic with a QoS matching all its current publishers."""
        for topic in self.recorder.topics:
            infos = self.get_publishers_info_by_topic(topic)
            if not infos:
                continue
            offered = [to_bag_qos(i.qos_profile) for i in infos]
            key = matched_subscription_qos(offered)
            self.recorder.set_topic_qos(topic, offered, latched=key[1])
            old = self._subs.get(topic)
            if old is not None and old[1] == key:
                continue
            if old is not None:
                self.destroy_subscription(old[0])
                self.get_logger().info(f"{topic}: publishers changed, resubscribing reliable={key[0]} "
                                       f"transient_local={key[1]}")
            qos = QoSProfile(depth=SUBSCRIPTION_DEPTH, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE if key[0] else ReliabilityPolicy.BEST_EFFORT,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if key[1] else DurabilityPolicy.VOLATILE)
            sub = self.create_subscription(self._classes[topic], topic, functools.partial(self._on_raw, topic),
                                           qos, raw=True)
            self._subs[topic] = (sub, key)

    def _on_raw(self, topic: str, data: bytes, info) -> None:
        self.recorder.submit(topic, data, info.get("received_timestamp") or time.time_ns(),
                             info.get("source_timestamp") or None)

    # ------------------------------------------------------------------------------------------ services
    def _serve(self, name: str, resp, action):
        """``resp`` answered with ``action()``'s message, or refused with the RecorderError it raised."""
        try:
            resp.message = action()
            resp.success = True
        except RecorderError as e:
            resp.success, resp.message = False, str(e)
            self.get_logger().error(f"~/{name} refused: {e}")
        return resp

    def _on_start(self, _req, resp):
        return self._serve("start", resp, lambda: str(self.recorder.start()))

    def _on_stop(self, _req, resp):
        def stop() -> str:
            s = self.recorder.stop()
            return f"{s.path}: {s.message_count} messages" + (f", dropped {s.dropped}" if s.dropped else "")
        return self._serve("stop", resp, stop)

    def _on_label(self, req, resp):
        return self._serve("label", resp,
                           lambda: f"{self.recorder.label(bool(req.data))}: {'success' if req.data else 'failure'}")

    # ------------------------------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        s = self.recorder.stats()
        now = time.monotonic()
        t0, b0 = self._bytes_mark
        rate = (s["bytes_total"] - b0) / max(now - t0, 1e-9) / 1e6
        self._bytes_mark = (now, s["bytes_total"])
        dropped = sum(s["dropped"].values())
        level = DiagnosticStatus.WARN if dropped or s["last_error"] else DiagnosticStatus.OK
        summary = (f"recording episode {s['episode']}" if s["recording"] else "idle") + (
            f", {dropped} dropped" if dropped else "")
        values = {"recording": s["recording"], "episode": s["episode"], "path": s["path"],
                  "queue": f"{s['queue']}/{s['queue_size']}", "mb_per_s": f"{rate:.3f}",
                  "messages_written": s["written_total"], "dropped_total": dropped,
                  "last_episode": s["last_episode"], "last_error": s["last_error"],
                  "subscribed": f"{len(self._subs)}/{len(self.recorder.topics)}"}
        values.update({f"dropped {t}": n for t, n in sorted(s["dropped"].items())})
        self.pub_diag.publish(diagnostic_array(now_ns(self), [(f"{self.get_name()}: recorder", level, summary,
                                                               values)], hardware_id=self.station.name))

    def destroy_node(self) -> None:
        self.recorder.close()
        super().destroy_node()


def _msg_class(msgtype: str):
    """The Python message class of 'pkg/msg/Name' (a raw subscription still needs it to match the type)."""
    pkg, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError):
        raise BagError(f"message type '{msgtype}' is not installed (no Python module {pkg}.msg.{name})") from None


def main(args=None) -> int:
    return run_node("episode_recorder", EpisodeRecorderNode, args)


if __name__ == "__main__":
    sys.exit(main())
