"""python -m services.lane: one rank of a lane (the rank comes from LIVEAVATAR_DIST_RANK / the LWS worker index)."""

import os

from services.common.logging import configure_logging, get_logger
from services.lane.worker import LaneSettings, run_lane_rank


def main() -> None:
    if "LWS_WORKER_INDEX" in os.environ and "LIVEAVATAR_DIST_RANK" not in os.environ:
        os.environ["LIVEAVATAR_DIST_RANK"] = os.environ["LWS_WORKER_INDEX"]
    settings = LaneSettings()
    configure_logging(json_logs=settings.json_logs, level=settings.log_level)
    get_logger("lane").info("config", **settings.log_safe())
    run_lane_rank(settings)


if __name__ == "__main__":
    main()
