"""ROS-free camera ingest: settings, capture thread with newest-frame slot and reconnect, calibration, health.
The camera_ingest node (recap_ros.nodes.camera_ingest) only wires these to topics, parameters and timers."""
from recap_ros.camera.calibration import Calibration, fit_calibration, load_calibration, uncalibrated
from recap_ros.camera.capture import (CaptureStats, CaptureThread, Delivery, Frame, FrameSlot, OpenError,
                                      backend_available, open_capture, to_output_rgb)
from recap_ros.camera.health import CameraHealth, LatencyWindow, RateMeter, camera_health
from recap_ros.camera.settings import CameraConfigError, CameraSettings, camera_settings

__all__ = ["Calibration", "CameraConfigError", "CameraHealth", "CameraSettings", "CaptureStats", "CaptureThread",
           "Delivery", "Frame", "FrameSlot", "LatencyWindow", "OpenError", "RateMeter", "backend_available",
           "camera_health", "camera_settings", "fit_calibration", "load_calibration", "open_capture",
           "to_output_rgb", "uncalibrated"]
