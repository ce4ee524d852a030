"""The simulated datacenter the main job runs on by default (see the README)."""
