"""ROS 2 nodes, one file each; they only wire ROS topics, parameters and timers to the ROS-free modules."""
from __future__ import annotations

import sys
from typing import Callable


def run_node(name: str, make_node: Callable, args=None, make_executor: Callable | None = None,
             config_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Shared ``main`` body: init rclpy, build the node, spin until SIGINT / shutdown, clean up.

    A configuration error (``config_errors``, plus StationConfigError) is printed as one line naming the node
    and returns exit code 2 instead of a traceback; SIGINT returns 0. ``make_executor()`` defaults to the
    single-threaded executor; ``make_executor(node)`` builds another one (after the node exists).
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from recap_ros.station import StationConfigError

    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        executor = make_executor(node) if make_executor else SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (StationConfigError, *config_errors) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
