"""The TAP device: open, configure, read and write Ethernet frames."""
