"""The D-Bus adapter: a thin layer over the engine. Nothing below it knows about D-Bus."""
