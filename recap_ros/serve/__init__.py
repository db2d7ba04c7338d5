"""Remote inference over openpi's websocket policy protocol (ROS-free).

``protocol``: the wire format (msgpack-numpy frames as ``openpi-client`` packs them, the observation, the reply,
the handshake metadata), strict decoding of untrusted frames; ``server``: ``recap-serve``, one model behind a
websocket server; ``client``: :class:`~recap_ros.serve.client.RemotePolicy`, the policy runtime contract over
that protocol (policy_server's ``remote`` backend).
"""
