"""gateway: the ingress gateway of a sandbox platform.

``https://{port}-{sandboxId}.{domain}`` reaches ``{port}`` inside sandbox ``{sandboxId}``, whose
address the gateway finds in a Redis catalog. The public surface is small on purpose:

- :class:`Config` and :func:`load_config`: settings;
- :class:`Gateway`: one serving process;
- the ``gateway`` command (``gateway.cli``).

Everything else is internal and may change.
"""

import os

if os.environ.get("GATEWAY_PURE") == "1":  # (before any compiled module is imported: gateway/native.py)
    from gateway import native

    native.prefer_source()

from gateway.config import Config, ConfigError, load_config
from gateway.server import Gateway

__all__ = ["Config", "ConfigError", "Gateway", "load_config"]
__version__ = "0.1.0"
