"""Peer links: COPS framing, messages, link state, tree routing, transports."""
