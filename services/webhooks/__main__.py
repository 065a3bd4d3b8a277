"""python -m services.webhooks: settings, logging, the effective config logged once, then the dispatcher."""

from services.common.logging import configure_logging, get_logger
from services.webhooks.settings import WebhookSettings
from services.webhooks.worker import SERVICE, Dispatcher


def main() -> None:
    settings = WebhookSettings()
    configure_logging(json_logs=settings.json_logs, level=settings.log_level)
    get_logger(SERVICE).info("config", **settings.log_safe())
    Dispatcher(settings).run()


if __name__ == "__main__":
    main()
