"""The development lab: what the tests, the demo and the benchmarks run on, never shipped.

- :mod:`speedloader_lab.sandbox` a private system bus, a real polkitd and speedloaderd on it
- :mod:`speedloader_lab.modelgen` builders of real model files in every layout the catalog knows

The wheel leaves this package out (pyproject's ``packages.find`` lists only the shipped
ones). Everything that imports it runs from a checkout with the repository root on the
module path: pytest (``pythonpath = ["."]``), ``python3 -m bench`` from the root, and
``scripts/demo``, which sets ``PYTHONPATH``.
"""
