"""The Gogs stand-in the lab's artifact mirror serves as `gogs/<version>/gogs` (simulated).

`standin.py` is one self-contained executable (Debian's python3, standard library only)
that a lab host runs exactly as it would run the real Gogs binary. Nothing imports it:
tests start it as a subprocess.
"""
