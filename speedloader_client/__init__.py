"""The client side of speedloaderd's bus, shared by slctl, the dashboard and the tests.

- ``client``: the connection (calls, signals, jobs followed by their signals).
- ``records``: one record per bus interface, the one table of its properties.
- ``errors``: what a failed call says to a person (titles and hints).
- ``fmt``: how sizes, rates and times read.

Importing this package imports none of them (the daemon imports ``records`` alone).
"""
