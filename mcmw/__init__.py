"""mcmw, the Multicast Middleware: the node that composes tap/, igmp/ and overlay/."""

__version__ = "0.1.0"
