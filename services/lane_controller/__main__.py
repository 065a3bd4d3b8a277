"""python -m services.lane_controller: settings, logging, the effective config logged once, then the loop."""

from services.common.logging import configure_logging, get_logger
from services.common.redis_state import StateStore
from services.common.worker import GracefulStop
from services.lane_controller.controller import SERVICE, LaneController, kube_api_client
from services.lane_controller.settings import LaneControllerSettings


def main() -> None:
    settings = LaneControllerSettings()
    configure_logging(json_logs=settings.json_logs, level=settings.log_level)
    get_logger(SERVICE).info("config", **settings.log_safe())
    store = StateStore.from_settings(settings)
    controller = LaneController(settings, kube_api_client(settings.kubeconfig), store)
    controller.run(GracefulStop().install())


if __name__ == "__main__":
    main()
