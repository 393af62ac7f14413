"""Remote RAM pools: plans that export RAM on another host over NVMe-oF and mount it here.

- values.py   validated values (NQNs, addresses, sizes, SSH targets)
- plan.py     steps with undos, the executor and its rollback
- nvmeof.py   the connect/disconnect plans for one pool
- sysfs.py    finding the namespace's block device without udev
- runners.py  where commands run: locally or over SSH with host key checking
"""
