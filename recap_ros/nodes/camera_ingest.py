"""camera_ingest: one camera of a station -> sensor_msgs/Image (rgb8, stamp = capture time), CameraInfo and a
JPEG CompressedImage side-stream (encoded only while someone subscribes), plus /diagnostics.

Parameters: ``station`` (name or path), ``camera`` (camera name in the station). Every key of the station's
camera entry (source, width, height, fps, output_width, output_height, resize, jpeg_quality, frame_id,
camera_info_file, loop) can be overridden by a ROS parameter of the same name; node-only parameters are listed
in recap_ros.camera.settings.NODE_DEFAULTS (qos: sensor|reliable, timeouts, reconnect backoff, fourcc,
diagnostics_period_s, opencv_threads). Capture, reconnect and health live in recap_ros.camera; this file only
wires them. RTSP over TCP instead of UDP: OPENCV_FFMPEG_CAPTURE_OPTIONS="rtsp_transport;tcp" (per process).
"""
from __future__ import annotations

import time

import cv2
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from recap_ros.camera import (CameraConfigError, CaptureThread, Delivery, Frame, FrameSlot, LatencyWindow,
                              RateMeter, camera_health, camera_settings, fit_calibration, load_calibration,
                              to_output_rgb, uncalibrated)
from recap_ros.camera.settings import CAMERA_KEYS, NODE_DEFAULTS
from recap_ros.imaging import encode_jpeg
from recap_ros.nodes import run_node
from recap_ros.rosmsg import SENSOR_QOS, compressed_msg, image_msg, ns_to_stamp
from recap_ros.station import load_station

RELIABLE_IMAGE_QOS = QoSProfile(depth=SENSOR_QOS.depth, reliability=ReliabilityPolicy.RELIABLE)


class CameraIngest(Node):
    def __init__(self, **kwargs):
        super().__init__("camera_ingest", **kwargs)
        self.capture: CaptureThread | None = None
        self.delivery: Delivery | None = None
        station = load_station(self._param("station", "sim"))
        camera_name = self._param("camera", "")
        try:
            cam = station.camera(camera_name)
        except KeyError:
            raise CameraConfigError(f"ROS parameter 'camera': no camera {camera_name!r} in {station.file} "
                                    f"(cameras: {[c.name for c in station.cameras]})") from None
        overrides = {}
        for key in CAMERA_KEYS:
            value = self._param(key, getattr(cam, key))
            if value != getattr(cam, key):
                overrides[key] = value
        for key, default in NODE_DEFAULTS.items():
            value = self._param(key, default)
            if value != default:
                overrides[key] = value
        self.settings = s = camera_settings(cam, overrides, station.file)
        # one camera per process: OpenCV's per-core thread pool only oversubscribes the cores shared with the
        # other cameras and the policy (bench/camera_latency.py: ~30 % less CPU per camera, same latency)
        cv2.setNumThreads(s.opencv_threads)
        cal = load_calibration(s.camera_info_file) if s.camera_info_file else uncalibrated(1, 1)
        self._info = _camera_info_msg(fit_calibration(cal, s.output_width, s.output_height, s.resize), s.frame_id)

        qos = SENSOR_QOS if s.qos == "sensor" else RELIABLE_IMAGE_QOS
        self._image_pub = self.create_publisher(Image, cam.image_topic, qos)
        self._jpeg_pub = self.create_publisher(CompressedImage, cam.compressed_topic, qos)
        self._info_pub = self.create_publisher(CameraInfo, cam.camera_info_topic, qos)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        slot = FrameSlot()
        self._latency = LatencyWindow()
        self._capture_rate, self._publish_rate = RateMeter(), RateMeter()
        self.capture = CaptureThread(s, slot, self._now_ns, self._log_event)
        self.delivery = Delivery(slot, self._publish, self._latency, self.get_logger().error,
                                 name=f"publish-{s.name}")
        self.create_timer(s.diagnostics_period_s, self._publish_diagnostics)
        self.get_logger().info(
            f"camera {s.name}: {s.source_text} requested {s.width}x{s.height} @ {s.fps:g} fps -> "
            f"{cam.image_topic} {s.output_width}x{s.output_height} ({s.resize}), JPEG q{s.jpeg_quality} on "
            f"{cam.compressed_topic} while subscribed, QoS {s.qos}")
        self.delivery.start()
        self.capture.start()

    def _param(self, name: str, default):
        return self.declare_parameter(name, default, ParameterDescriptor(dynamic_typing=True)).value

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _log_event(self, level: str, text: str) -> None:
        # one call site per severity: rclpy refuses a severity change at the same call site
        if level == "error":
            self.get_logger().error(text)
        elif level == "warn":
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def _publish(self, frame: Frame) -> int:
        """Convert and publish one frame; returns the node time (ns) at which the Image went out."""
        s = self.settings
        rgb = to_output_rgb(frame.image, s)
        self._image_pub.publish(image_msg(rgb, frame.stamp_ns, s.frame_id))
        published_ns = self._now_ns()
        self._info.header.stamp = ns_to_stamp(frame.stamp_ns)
        self._info_pub.publish(self._info)
        if self._jpeg_pub.get_subscription_count() > 0:
            self._jpeg_pub.publish(compressed_msg(encode_jpeg(rgb, s.jpeg_quality), frame.stamp_ns, s.frame_id))
        return published_ns

    def _publish_diagnostics(self) -> None:
        s, stats = self.settings, self.capture.stats()
        t = time.monotonic()
        p50, p99 = self._latency.percentiles_ms(50, 99)
        health = camera_health(stats, requested_fps=s.fps, capture_fps=self._capture_rate.update(t, stats.frames),
                               publish_fps=self._publish_rate.update(t, self.delivery.delivered),
                               published=self.delivery.delivered, latency_p50_ms=p50, latency_p99_ms=p99,
                               source=s.source_text)
        status = DiagnosticStatus(level=bytes([health.level]), name=f"{self.get_name()}: camera {s.name}",
                                  message=health.message, hardware_id=s.source_text,
                                  values=[KeyValue(key=k, value=v) for k, v in health.values])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)

    def destroy_node(self):
        """Stop capture and delivery threads first (a blocked live read ends within read_timeout_s)."""
        if self.capture is not None:
            self.capture.stop(timeout=2.0)
        if self.delivery is not None:
            self.delivery.stop(timeout=1.0)
        return super().destroy_node()


def _camera_info_msg(cal, frame_id: str) -> CameraInfo:
    msg = CameraInfo()
    msg.header.frame_id = frame_id
    msg.width, msg.height = cal.width, cal.height
    msg.distortion_model = cal.distortion_model
    msg.d = cal.d.tolist()
    msg.k, msg.r, msg.p = cal.k.ravel().tolist(), cal.r.ravel().tolist(), cal.p.ravel().tolist()
    return msg


def main(args=None) -> int:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # failures are reported by us, once
    return run_node("camera_ingest", CameraIngest, args, config_errors=(CameraConfigError,))


if __name__ == "__main__":
    raise SystemExit(main())
