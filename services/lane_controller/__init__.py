"""The lane controller: scales each tenant lane pool's LeaderWorkerSet to the pool's session demand.

``python -m services.lane_controller``; see :mod:`services.lane_controller.controller` and docs/lane-controller.md.
"""
