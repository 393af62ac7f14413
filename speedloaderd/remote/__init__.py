"""Remote RAM pools: plans that export RAM on another host over NVMe-oF and mount it here.

- values.py   validated values (NQNs, addresses, sizes, SSH targets)
- plan.py     steps with undos, the executor and its rollback
- nvmeof.py   the connect / disconnect / grow plans for one pool
- pool.py     RemotePool: a remote pool as the engine holds it (beside pools.TmpfsPool);
              RemotePoolLink: one SSH session and the plans of one remoteTiers entry
- probe.py    is a connected pool still usable (sysfs + /proc/mounts only)
- sysfs.py    finding the namespace's block device without udev
- uevents.py  waiting on kernel uevents (pyudev) with a sysfs fallback
- runners.py  where commands run: locally or over SSH with host key checking
"""
