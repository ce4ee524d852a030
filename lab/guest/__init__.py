"""What lab hosts run in place of commands that would change the machine they share.

Each file here is a LAB STAND-IN bind-mounted (read-only) inside every lab host by its
PID 1, lab/host_init.py, which documents the whole set. They run under the machine's
/usr/bin/python3 with the standard library only (plus netplan's own Python modules for
netplan.py), never under the project's venv.
"""
