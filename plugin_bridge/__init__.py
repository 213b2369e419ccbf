"""unbake's client side: numpy, pyzmq, msgpack, pedalboard; never torch.

``from plugin_bridge import Client, Stems, StemStream, Session`` (see ``plugin_bridge.client``) and
``StemChain``, per-stem pedalboard chains (``plugin_bridge.stemchain``).
The names are imported on first use, so ``plugin_bridge.cli`` starts without loading zmq.
"""

__all__ = ["Client", "Session", "Stems", "StemStream", "StemChain"]


def __getattr__(name: str):
    if name == "StemChain":
        from .stemchain import StemChain
        return StemChain
    if name in __all__:
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module 'plugin_bridge' has no attribute {name!r}")
