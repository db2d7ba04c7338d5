"""cfg_guidance: owns the classifier-free guidance β the policy server samples with.

Wiring only; validation, the per-task table lookup and the back-off live in :mod:`recap_ros.control.guidance`.

- Parameter ``beta`` (double, declared range [1.0, 2.5]; an on-set callback also rejects the gap (1, 1.5) with
  the reason): β = 1 disables guidance, otherwise [1.5, 2.5]. Default: the station's ``policy.beta``.
- Per-task β: the station's ``policy.beta_table`` keyed by prompt; a new prompt on ``policy.prompt_topic``
  selects its table entry (else the ``beta`` parameter). Setting ``beta`` at run time applies to the current
  task at once.
- Publishes the active β on ``policy.beta_topic`` (std_msgs/Float64, transient-local) on every change; the
  server applies it from its next chunk.
- Watches ``policy.stats_topic``: when chunks sampled with the active β > 1 exceed ``backoff_velocity_ratio``
  (peak joint velocity / limit) or come closer than ``backoff_limit_margin`` (fraction of the joint range) to
  a limit for ``backoff_patience`` chunks in a row, β steps down by ``backoff_step`` toward 1; after
  ``recover_after`` calm chunks it steps back up toward the requested β (0: never). Every change is logged.
"""
from __future__ import annotations

import sys

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import (
    FloatingPointRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
)
from rclpy.node import Node
from std_msgs.msg import Float64, String

from recap_ros import rosmsg
from recap_ros.control.guidance import (
    BETA_OFF,
    BackoffConfig,
    BetaBackoff,
    BetaChange,
    beta_for_task,
    beta_problem,
)
from recap_ros.nodes import run_node
from recap_ros.station import BETA_MAX, load_station

CHUNK_STATUS = "policy_server: chunk"
STATS_KEYS = ("beta", "peak_velocity_ratio", "min_limit_margin")


class CfgGuidance(Node):
    def __init__(self, **node_kwargs):
        super().__init__("cfg_guidance", **node_kwargs)
        self.station = load_station(self.declare_parameter("station", "sim").value)
        pol = self.station.policy
        self.table = dict(pol.beta_table)
        self.prompt = self.declare_parameter("prompt", pol.prompt).value.strip()
        d = BackoffConfig()
        config = BackoffConfig(
            max_velocity_ratio=float(self.declare_parameter("backoff_velocity_ratio", d.max_velocity_ratio).value),
            min_limit_margin=float(self.declare_parameter("backoff_limit_margin", d.min_limit_margin).value),
            step=float(self.declare_parameter("backoff_step", d.step).value),
            patience=int(self.declare_parameter("backoff_patience", d.patience).value),
            recover_after=int(self.declare_parameter("recover_after", d.recover_after).value))
        self.add_on_set_parameters_callback(self._check_params)
        self.beta_param = self._declare_beta(pol.beta)
        self.backoff = BetaBackoff(config, beta_for_task(self.table, self.prompt, self.beta_param))
        self.add_post_set_parameters_callback(self._on_params_set)
        self.changes = 0

        self.pub_beta = self.create_publisher(Float64, pol.beta_topic, rosmsg.LATCHED_QOS)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(String, pol.prompt_topic, self._on_prompt, rosmsg.LATCHED_QOS)
        self.create_subscription(DiagnosticArray, pol.stats_topic, self._on_stats, rosmsg.EVENT_QOS)
        self.create_timer(1.0, self._publish_diagnostics)
        self._publish()
        self.get_logger().info(
            f"β = {self.backoff.active} for '{self.prompt}' (parameter {self.beta_param}, table {self.table}); "
            f"back-off {config}; publishing on {pol.beta_topic}")

    def _declare_beta(self, default: float) -> float:
        descriptor = ParameterDescriptor(
            description="CFG β: 1.0 disables guidance, otherwise within [1.5, 2.5]",
            floating_point_range=[FloatingPointRange(from_value=BETA_OFF, to_value=BETA_MAX, step=0.0)])
        try:
            return float(self.declare_parameter("beta", float(default), descriptor).value)
        except (InvalidParameterValueException, InvalidParameterTypeException) as e:
            self.get_logger().error(f"parameter beta override rejected ({e}); using the station's β = {default}")
            return float(self.declare_parameter("beta", float(default), descriptor, ignore_override=True).value)

    # ---------------------------------------------------------------------------------------- parameters
    def _check_params(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "beta":
                problem = beta_problem(p.value)
                if problem:
                    return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _on_params_set(self, params) -> None:
        for p in params:
            if p.name == "beta":
                self.beta_param = float(p.value)
                self._apply(self.backoff.request(self.beta_param, "parameter beta"))

    # ---------------------------------------------------------------------------------------- topics
    def _on_prompt(self, msg: String) -> None:
        prompt = msg.data.strip()
        if not prompt or prompt == self.prompt:
            return
        self.prompt = prompt
        source = "task table" if prompt in self.table else "parameter beta"
        self._apply(self.backoff.request(beta_for_task(self.table, prompt, self.beta_param),
                                         f"{source} for '{prompt}'"))

    def _on_stats(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name != CHUNK_STATUS:
                continue
            values = rosmsg.diagnostic_values(status)
            try:
                beta, ratio, margin = (float(values[k]) for k in STATS_KEYS)
            except (KeyError, ValueError) as e:
                self.get_logger().warning(f"ignoring chunk stats without usable {STATS_KEYS}: {e} in {values}",
                                       throttle_duration_sec=5.0)
                continue
            self._apply(self.backoff.observe(beta, ratio, margin))

    def _apply(self, change: BetaChange | None) -> None:
        if change is None:
            return
        self.changes += 1
        self.get_logger().info(f"β {change.old:g} -> {change.new:g}: {change.reason}")
        self._publish()

    def _publish(self) -> None:
        self.pub_beta.publish(Float64(data=self.backoff.active))

    def _publish_diagnostics(self) -> None:
        b = self.backoff
        level = 0 if b.active == b.requested else 1
        message = f"β = {b.active:g}" + ("" if level == 0 else f" (backed off from {b.requested:g})")
        self.pub_diag.publish(rosmsg.diagnostic_array(rosmsg.now_ns(self), [("cfg_guidance", level, message, {
            "beta_active": b.active, "beta_requested": b.requested, "beta_parameter": self.beta_param,
            "prompt": self.prompt, "changes": self.changes})]))


def main(args=None) -> int:
    return run_node("cfg_guidance", CfgGuidance, args)


if __name__ == "__main__":
    sys.exit(main())
